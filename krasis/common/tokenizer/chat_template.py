"""Chat template rendering with the jinja semantics of transformers' apply_chat_template.

Templates come from model repositories, so they run in jinja's immutable sandbox and see only
plain JSON-like data, as in transformers (utils/chat_template_utils.py).
"""

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TokenizerError, one_line

# Names a message's reasoning arrives under; templates read `reasoning_content` (gpt-oss reads `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: list[dict],
    tools: list[dict] | None,
    documents: list[dict] | None,
    add_generation_prompt: bool,
    variables: dict,
) -> str:
    """Render one conversation; `variables` are the special tokens plus caller template kwargs."""
    messages = normalize_messages(messages)
    tools = _plain_list(tools, "tools")
    documents = _plain_list(documents, "documents")
    variables = _plain(variables, "template kwargs")
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables
        )
    except Exception as e:
        # Templates are foreign code run on user input: a TypeError from "'x' + content_list" is as much
        # a bad request as raise_exception(...) is.
        raise TokenizerError(f"chat template error: {one_line(e)}") from e


def normalize_messages(messages) -> list[dict]:
    """Validate messages and copy them to plain data, dropping None fields as transformers does."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"message {i} is a {type(message).__name__}, not a dict")
        message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message.get("role"), str):
            raise TokenizerError(f"message {i} needs a string 'role'")
        if not isinstance(message.get("content", ""), (str, list)):
            raise TokenizerError(f"message {i} 'content' must be a string or a list of parts")
        normalized.append(_alias_reasoning(_plain(message, f"message {i}")))
    return normalized


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value, where: str):
    # Rebuild everything the template sees from exact JSON types: subclasses could carry methods
    # the sandbox does not know to block.
    if value is None or type(value) in (str, int, float, bool):
        return value
    # str.__str__ and friends strip subclasses (enums, numpy scalars) back to the base value
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return convert(value)
    if isinstance(value, dict):
        return {_plain(key, where): _plain(item, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, where) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item, where) for item in value)
    raise TokenizerError(f"{where} holds a {type(value).__name__}; only JSON-like values can reach a chat template")


def _plain_list(value, where: str) -> list | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
        raise TokenizerError(f"{where} must be a list of JSON schema dicts")
    return _plain(list(value), where)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore names that lead to CPython internals."""

    def __init__(*args, **kwargs):
        # jinja's own signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _TemplateDict:
    """dict() for templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, & and ' which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not compile: {one_line(e)}") from e
