"""Chat rendering and chat encoding equal transformers' apply_chat_template; bad chats are clear errors."""

import json

import pytest

from krasis.common.tokenizer import Tokenizer, TokenizerError
from tests.unit.tokenizer_fixtures import (  # noqa: F401 (fixtures)
    load_reference,
    model_dir,
    reference,
    style,
    tokenizer,
    write_model_dir,
)

SYSTEM = {"role": "system", "content": "You are terse. 你好 🙂"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, e.g. 北京 <b>& 'Zürich'",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris and Berlin?"},
    {
        "role": "assistant",
        "content": None,  # OpenAI clients send None here; transformers drops such fields
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}},
        ],
    },
    {"role": "tool", "content": "18°C"},
    {"role": "tool", "content": "12°C"},
]
CHATS = {
    "user": [{"role": "user", "content": "Hi!"}],
    "system_user": [SYSTEM, {"role": "user", "content": "Hi!"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 東京?\n\n  Spaces  "},
    ],
}

# Exercises the jinja setup itself: loop controls, namespace, dict(), tojson options, the
# generation tag, reasoning aliases, dropped None fields and special-token variables.
FEATURE_TEMPLATE = """\
{%- set ns = namespace(count=0) %}
{{- bos_token | default('') }}
{%- for message in messages %}
    {%- if message.role == 'stop' %}{% break %}{% endif %}
    {%- if message.role == 'skip' %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- set extra = dict(n=ns.count, has_name=message.name is defined) %}
    {{- message.role }}|{{ message.content }}|{{ extra | tojson(sort_keys=true) }}
    {%- if message.reasoning_content is defined %}|think:{{ message.reasoning_content }}{% endif %}
    {%- if message.role == 'assistant' %}{% generation %}[{{ message.content }}]{% endgeneration %}{% endif %}
    {{- eos_token }}
{% endfor %}
{%- if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{%- if add_generation_prompt %}>{{ greeting | default('') }}{% endif %}"""


def _render_both(tokenizer, reference, messages, **kwargs):
    ours = tokenizer.apply_chat_template(messages, **kwargs)
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)
    theirs = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return ours, theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
def test_render_matches_transformers(tokenizer, reference, chat, add_generation_prompt):
    ours, theirs = _render_both(tokenizer, reference, CHATS[chat], add_generation_prompt=add_generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
def test_encode_chat_matches_transformers(tokenizer, reference, chat, add_generation_prompt):
    ours = tokenizer.encode_chat(CHATS[chat], add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(
        CHATS[chat], tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs


@pytest.mark.parametrize("with_system", [True, False])
def test_render_with_tools_matches_transformers(tokenizer, reference, style, with_system):
    messages = ([SYSTEM] if with_system else []) + CHATS["user"]
    ours, theirs = _render_both(tokenizer, reference, messages, tools=TOOLS)
    assert ours == theirs
    if style == "chatml":
        # tojson must not HTML-escape or ASCII-escape what the model reads
        assert "北京 <b>& 'Zürich'" in ours and ours.count("<|im_start|>system") == 1


def test_tool_calls_and_results_match_transformers(tmp_path):
    write_model_dir(tmp_path, "chatml")
    tokenizer, reference = Tokenizer.from_dir(tmp_path), load_reference(tmp_path)
    ours, theirs = _render_both(tokenizer, reference, [SYSTEM] + TOOL_TURNS, tools=TOOLS)
    assert ours == theirs
    assert '"arguments": {"city": "Paris"}' in ours and '"arguments": {"city": "Berlin"}' in ours
    assert ours.count("<tool_response>") == 2 and ours.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode_chat([SYSTEM] + TOOL_TURNS, tools=TOOLS)
    assert ids == reference.apply_chat_template([SYSTEM] + TOOL_TURNS, tools=TOOLS, add_generation_prompt=True,
                                                return_dict=False)


def test_template_kwargs_reach_the_template(tokenizer, reference, style):
    messages = CHATS["user"]
    ours, theirs = _render_both(tokenizer, reference, messages, enable_thinking=False)
    assert ours == theirs
    if style == "chatml":
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_generation_prompt_toggles_the_assistant_header(tokenizer, style):
    with_prompt = tokenizer.apply_chat_template(CHATS["user"], add_generation_prompt=True)
    without = tokenizer.apply_chat_template(CHATS["user"], add_generation_prompt=False)
    header = "<|im_start|>assistant\n" if style == "chatml" else "Assistant:"
    assert with_prompt == without + header


def test_deepseek_chat_has_exactly_one_bos(tmp_path):
    write_model_dir(tmp_path, "deepseek")
    tokenizer = Tokenizer.from_dir(tmp_path)
    ids = tokenizer.encode_chat(CHATS["multi_turn"])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_jinja_features_match_transformers(tmp_path):
    write_model_dir(tmp_path, "deepseek")
    (tmp_path / "chat_template.jinja").write_text(FEATURE_TEMPLATE)
    messages = [
        {"role": "user", "content": "a", "name": None},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "b", "reasoning": "because", "name": "bot"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never rendered"},
    ]
    tokenizer, reference = Tokenizer.from_dir(tmp_path), load_reference(tmp_path)
    ours, theirs = _render_both(tokenizer, reference, messages, tools=TOOLS, greeting="hey")
    assert ours == theirs
    assert "think:because" in ours and "[b]" in ours and "never rendered" not in ours
    assert '"has_name": false' in ours and ours.endswith(">hey")


def test_config_template_used_when_no_jinja_file(tmp_path, style):
    write_model_dir(tmp_path, style)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ours, theirs = _render_both(Tokenizer.from_dir(tmp_path), load_reference(tmp_path), CHATS["multi_turn"])
    assert ours == theirs


def test_jinja_file_wins_over_config_template(tmp_path):
    write_model_dir(tmp_path, "chatml")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "WRONG"}))
    rendered = Tokenizer.from_dir(tmp_path).apply_chat_template(CHATS["user"])
    assert rendered.startswith("<|im_start|>user\nHi!")


def test_named_templates_pick_tool_use_when_tools_given(tmp_path):
    write_model_dir(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.apply_chat_template(CHATS["user"]) == "plain"
    assert tokenizer.apply_chat_template(CHATS["user"], tools=TOOLS) == "tools"


def test_missing_chat_template_is_a_clear_error(tmp_path):
    write_model_dir(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match="has no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHATS["user"])


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "message 0 is a str"),
        ([{"content": "no role"}], "message 0 needs a string 'role'"),
        ([{"role": "user", "content": "ok"}, {"role": 3, "content": "x"}], "message 1 needs a string 'role'"),
        ([{"role": "user", "content": 42}], "'content' must be a string or a list"),
        ([{"role": "user", "content": "x", "meta": object()}], "message 0 holds a object"),
    ],
)
def test_malformed_messages_are_clear_errors(tokenizer, messages, message):
    with pytest.raises(TokenizerError, match=message) as caught:
        tokenizer.apply_chat_template(messages)
    assert "\n" not in str(caught.value)


def test_template_raise_exception_becomes_tokenizer_error(tmp_path):
    write_model_dir(tmp_path, "chatml")
    tokenizer = Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="Unexpected message role: narrator"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_content_the_template_cannot_handle_is_a_clear_error(tmp_path):
    write_model_dir(tmp_path, "chatml")
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(TokenizerError, match="chat template error"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(parts)


def test_broken_template_is_a_clear_error(tmp_path):
    write_model_dir(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match="^chat template does not compile") as caught:
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHATS["user"])
    assert "\n" not in str(caught.value)


def test_sandbox_blocks_python_internals(tmp_path):
    write_model_dir(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="chat template error"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHATS["user"])


def test_tools_must_be_schema_dicts(tokenizer):
    with pytest.raises(TokenizerError, match="tools must be a list of JSON schema dicts"):
        tokenizer.apply_chat_template(CHATS["user"], tools=[print])

