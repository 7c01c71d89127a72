"""OpenAI request bodies -> typed, validated requests; every bad field is an ApiError that names it.

No HTTP here: app.py turns ApiError into the OpenAI error JSON. Unknown fields are ignored (clients
send many); known fields whose effect we cannot honour (logit_bias, echo, suffix...) are refused.
"""

import dataclasses
from dataclasses import dataclass

from krasis.common.sampling_params import SamplingParams

MAX_N = 16
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Request field -> SamplingParams field, with the JSON types accepted.
SAMPLING_FIELDS = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "repetition_penalty": (int, float),
    "seed": (int,),
    "ignore_eos": (bool,),
}


class ApiError(Exception):
    """An error answer: HTTP status, message, and the OpenAI `type`, `param` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}


@dataclass(frozen=True)
class GenerationOptions:
    """The fields both endpoints share."""

    model: str | None
    params: SamplingParams  # max_tokens is a placeholder when `max_tokens` is None
    max_tokens: int | None  # None: whatever the context leaves after the prompt
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool  # vLLM's extension: prompt and output token ids in each choice


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None
    template_kwargs: dict
    add_generation_prompt: bool
    options: GenerationOptions


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str | list[int]]  # text, or token ids already checked against the vocabulary
    options: GenerationOptions


def parse_chat(body: dict, vocab_size: int) -> ChatRequest:
    messages = _messages(body.get("messages"))
    logprobs = _get(body, "logprobs", (bool,), False)
    top_logprobs = _get(body, "top_logprobs", (int,))
    if top_logprobs is not None and not logprobs:
        raise ApiError(400, "top_logprobs: requires logprobs to be true", "top_logprobs")
    options = _options(body, vocab_size, (top_logprobs or 0) if logprobs else None, "top_logprobs")
    tools = _get(body, "tools", (list,))
    tool_choice = _get(body, "tool_choice", (str, dict), "auto")
    if tool_choice not in ("auto", "none"):
        raise ApiError(400, "tool_choice: only 'auto' and 'none' are supported", "tool_choice")
    if tools is not None and any(not isinstance(t, dict) for t in tools):
        raise ApiError(400, "tools: each entry must be an object", "tools")
    return ChatRequest(
        messages=messages,
        tools=None if tool_choice == "none" else tools,
        template_kwargs=_get(body, "chat_template_kwargs", (dict,), {}),
        add_generation_prompt=_get(body, "add_generation_prompt", (bool,), True),
        options=options,
    )


def parse_completion(body: dict, vocab_size: int) -> CompletionRequest:
    logprobs = _get(body, "logprobs", (int,))
    if _get(body, "echo", (bool,), False):
        raise ApiError(400, "echo: not supported", "echo")
    if _get(body, "suffix", (str,)):
        raise ApiError(400, "suffix: not supported", "suffix")
    options = _options(body, vocab_size, logprobs, "logprobs")
    best_of = _get(body, "best_of", (int,))
    if best_of is not None and best_of != options.n:
        raise ApiError(400, "best_of: only best_of == n is supported", "best_of")
    return CompletionRequest(_prompts(body.get("prompt"), vocab_size), options)


def _options(body: dict, vocab_size: int, logprobs: int | None, logprobs_field: str) -> GenerationOptions:
    model = _get(body, "model", (str,))
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n: must be between 1 and {MAX_N}, got {n}", "n")
    stream = _get(body, "stream", (bool,), False)
    stream_options = _get(body, "stream_options", (dict,))
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", "stream_options")
    include_usage = _get(stream_options or {}, "include_usage", (bool,), False, "stream_options.include_usage")
    if _get(body, "logit_bias", (dict,)):
        raise ApiError(400, "logit_bias: not supported", "logit_bias")
    response_format = _get(body, "response_format", (dict,))
    if response_format is not None and response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format: only type 'text' is supported", "response_format")
    max_tokens = _max_tokens(body)
    params = _sampling_params(body, max_tokens or 1, logprobs, vocab_size, logprobs_field)
    return_ids = _get(body, "return_token_ids", (bool,), False)
    return GenerationOptions(model, params, max_tokens, n, stream, include_usage, return_ids)


def _max_tokens(body: dict) -> int | None:
    legacy = _get(body, "max_tokens", (int,))
    current = _get(body, "max_completion_tokens", (int,))
    if legacy is not None and current is not None and legacy != current:
        raise ApiError(400, f"max_tokens ({legacy}) and max_completion_tokens ({current}) disagree", "max_tokens")
    value = current if current is not None else legacy
    if value is not None and value < 1:
        field = "max_completion_tokens" if current is not None else "max_tokens"
        raise ApiError(400, f"{field}: must be >= 1, got {value}", field)
    return value


def _sampling_params(body: dict, max_tokens: int, logprobs: int | None, vocab_size: int,
                     logprobs_field: str) -> SamplingParams:
    fields = {name: _get(body, name, types) for name, types in SAMPLING_FIELDS.items()}
    fields = {name: value for name, value in fields.items() if value is not None}
    params = SamplingParams(max_tokens=max_tokens, stop=_stop(body.get("stop")), logprobs=logprobs, **fields)
    try:
        params.validate(vocab_size)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        field = logprobs_field if field == "logprobs" else field
        raise ApiError(400, f"{field}:{str(exc).split(':', 1)[1]}", field) from None
    return params


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(400, "stop: must be a string or a list of strings", "stop")
    return tuple(value)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages: must be a non-empty list of messages", "messages")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(index: int, message) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where}: must be an object", where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ApiError(400, f"{where}.role: unknown role {_short(role)}; expected one of {', '.join(CHAT_ROLES)}",
                       f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(_text_part(f"{where}.content[{i}]", part) for i, part in enumerate(content))
    elif content is None and not (role == "assistant" and message.get("tool_calls")):
        raise ApiError(400, f"{where}.content: required", f"{where}.content")
    elif content is not None and not isinstance(content, str):
        raise ApiError(400, f"{where}.content: must be a string or a list of text parts", f"{where}.content")
    # Templates know no "developer" role; OpenAI treats it as the system message of newer models.
    return {**message, "role": "system" if role == "developer" else role, "content": content}


def _text_part(where: str, part) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ApiError(400, f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported", where)
    return part["text"]


def _prompts(value, vocab_size: int) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            return [_token_ids("prompt", value, vocab_size)]
        if len(value) > MAX_PROMPTS:
            raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(value)}", "prompt")
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, list) for p in value):
            return [_token_ids(f"prompt[{i}]", p, vocab_size) for i, p in enumerate(value)]
    raise ApiError(400, "prompt: must be a string, a list of strings, a list of token ids, "
                        "or a list of token-id lists", "prompt")


def _token_ids(where: str, ids: list, vocab_size: int) -> list[int]:
    if not ids:
        raise ApiError(400, f"{where}: is empty", where)
    for i, token in enumerate(ids):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise ApiError(400, f"{where}[{i}]: token id {_short(token)} is outside the vocabulary "
                                f"(0..{vocab_size - 1})", where)
    return list(ids)


def _get(body: dict, name: str, types: tuple, default=None, where: str | None = None):
    """body[name] if present and not null, checked against `types` (bool is not an int here)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = " or ".join(_TYPE_NAMES[t] for t in types)
        raise ApiError(400, f"{where or name}: must be {expected}, got {_short(value)}", where or name)
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "a list",
               dict: "an object"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def with_sampling(options: GenerationOptions, max_tokens: int, seed_offset: int) -> SamplingParams:
    """The params of one choice: its max_tokens, and seed + index so n choices differ but reproduce."""
    seed = options.params.seed
    return dataclasses.replace(options.params, max_tokens=max_tokens,
                               seed=None if seed is None else seed + seed_offset)
