"""A model directory's tokenizer and chat template, giving the same ids and text as transformers 5.

Loads tokenizer.json with the `tokenizers` library the way transformers' TokenizersBackend does, and
renders chat templates in a jinja sandbox set up like transformers' apply_chat_template.
"""

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from .chat_template import render_chat_template
from .errors import TokenizerError, one_line
from .parallel import ParallelEncoder

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encodes, decodes and renders chats for one model; `from_dir` builds it from a model directory."""

    def __init__(
        self,
        backend: BackendTokenizer,
        config: dict,
        chat_template: str | dict[str, str] | None = None,
        extra_eos_token_ids: frozenset[int] = frozenset(),
        name: str = "model",
    ):
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self.special_tokens = _named_special_tokens(config)
        _add_missing_tokens(backend, config, self.special_tokens)
        # transformers applies the tokenizer_config flag to the backend on every encode
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # transformers skips this clean-up for BPE models because it would eat real spaces
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
        )
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        own_eos = frozenset() if eos_token_id is None else frozenset([eos_token_id])
        self.eos_token_ids: frozenset[int] = frozenset(extra_eos_token_ids) | own_eos
        self._parallel = ParallelEncoder.for_backend(backend)  # None: this tokenizer always encodes serially

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json, the chat template and eos ids from `model_dir`."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {model_dir}")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # the Rust loader raises bare Exception on malformed files
            raise TokenizerError(f"cannot load {path}: {one_line(e)}") from e
        config = _read_json(model_dir / "tokenizer_config.json")
        # generation_config.json is what transformers' generate() stops on; config.json is the fallback
        eos_ids = _eos_token_ids(_read_json(model_dir / "generation_config.json"))
        eos_ids = eos_ids or _eos_token_ids(_read_json(model_dir / "config.json"))
        template = _read_chat_template(model_dir, config)
        return cls(backend, config, template, eos_ids, name=str(model_dir))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' len(tokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Same ids as transformers' tokenizer(text)["input_ids"] (BOS only if tokenizer.json adds it)."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        # a long text goes in pieces on all cores where that gives the same ids (ParallelEncoder); otherwise the batch
        # entry point without character offsets gives the same ids, ~23% sooner than encode (31 -> 24 ms for a
        # 32K-token prompt on this project's CI-like box); a 32K prompt's TTFT includes its tokenizing
        if self._parallel is not None and (ids := self._parallel.encode(text, add_special_tokens)) is not None:
            return ids
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> str:
        """Render `messages` as transformers' apply_chat_template(..., tokenize=False) does."""
        template = self._select_chat_template(tools)
        documents = template_kwargs.pop("documents", None)
        # caller kwargs override the special tokens, as in transformers
        variables = {**self.special_tokens, **template_kwargs}
        return render_chat_template(template, messages, tools, documents, add_generation_prompt, variables)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> list[int]:
        """Prompt ids for a chat; like transformers, no special tokens are added (the template writes them)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def _select_chat_template(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if template is None:
            raise TokenizerError(f"{self.name} has no chat template (no chat_template.jinja or tokenizer_config entry)")
        if isinstance(template, str):
            return template
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise TokenizerError(f"{self.name} has several chat templates {sorted(template)} and no 'default'")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"malformed {path}: {one_line(e)}") from e


def _read_chat_template(model_dir: Path, config: dict) -> str | dict[str, str] | None:
    # Same precedence as transformers: template files beat the tokenizer_config entry.
    templates = {}
    if (model_dir / "chat_template.jinja").is_file():
        templates["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    entry = config.get("chat_template")
    if isinstance(entry, list):  # the older named-templates format
        return {item["name"]: item["template"] for item in entry}
    return entry


def _eos_token_ids(config: dict) -> frozenset[int]:
    eos = config.get("eos_token_id")
    if eos is None:
        eos = (config.get("text_config") or {}).get("eos_token_id")  # multimodal configs nest it
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _token_content(value) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _named_special_tokens(config: dict) -> dict[str, str]:
    return {name: _token_content(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None}


def _add_missing_tokens(backend: BackendTokenizer, config: dict, named: dict[str, str]) -> None:
    # transformers adds tokens that tokenizer_config declares but tokenizer.json lacks as added tokens;
    # doing the same keeps encode() identical for such (rare, hand-edited) directories.
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    by_id = config.get("added_tokens_decoder") or {}
    declared = [by_id[key] for key in sorted(by_id, key=int)]
    declared += [{"content": content, "special": True} for content in named.values()]
    for entry in declared:
        if entry["content"] in present:
            continue
        special = bool(entry.get("special", False))
        token = AddedToken(
            entry["content"],
            special=special,
            normalized=entry.get("normalized", not special),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            single_word=entry.get("single_word", False),
        )
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        present.add(entry["content"])


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, for WordPiece-era tokenizers that ask for it
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
