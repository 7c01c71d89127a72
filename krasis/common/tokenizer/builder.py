"""Writes a small deterministic byte-level BPE tokenizer (and chat template) into a model directory.

Used by the embedded default model and by test fixtures that build tiny checkpoints. The vocabulary
is trained on a fixed embedded corpus, so the same files come out byte for byte every time.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# An upper bound: with min_frequency=2 the small corpus stops training near 450 tokens. Small on
# purpose, so CJK characters and emoji stay split across several byte tokens for the streaming tests.
TRAINED_VOCAB_SIZE = 640

# Qwen2's pre-tokenizer split; transformers' Qwen2Tokenizer rebuilds exactly this pipeline around our
# vocab, so keeping it identical keeps both loaders in agreement.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# DeepSeek-V2 isolates CJK runs and digit groups before the GPT-2 style byte-level split.
DEEPSEEK_CJK_SPLIT = r"[一-龥ࠀ-一가-퟿]+"
DEEPSEEK_DIGIT_SPLIT = r"\p{N}{1,3}"

CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture-of-experts model routes every token to a few
experts out of many, so most of the weights stay idle for any one token. The GPU prefills the prompt
while the CPU workers decode, one token at a time, reading the expert weights from system memory.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? It is Paris.
Please answer the question in one short sentence, and then stop. The answer is 42.
User: Write a function that adds two numbers.
Assistant: Here is a function that adds two numbers.

def add(a: int, b: int) -> int:
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b


class Scheduler:
    def __init__(self, max_batch_size: int = 8):
        self.waiting = []
        self.running = []
        self.max_batch_size = max_batch_size

    def step(self):
        for request in list(self.waiting):
            if len(self.running) < self.max_batch_size:
                self.running.append(request)
                self.waiting.remove(request)
        return self.running

for i in range(10):
    print(f"step {i}: {i * i}")

{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}
if (x != null && y >= 0) { return x[y]; } else { throw new Error("bad index"); }
SELECT id, name FROM users WHERE age > 30 ORDER BY name;
你好，世界！今天天气很好。我们一起去公园散步吧。模型的专家在内存中。
日本語のテキストも少しあります。こんにちは、元気ですか？
안녕하세요, 만나서 반갑습니다.
Emoji: 🙂 🚀 👍 🎉 ❤️ — café, naïve, façade, Straße, Ελληνικά, русский текст.
Numbers: 3.14159, 2.71828, 1,000,000 and 0xFF; dates like 2026-02-01.
"""

CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role != 'system' %}
        {{- raise_exception('Unexpected message role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# DeepSeek-V2-Chat's template, verbatim.
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"

# (content, special): the order fixes their ids, right after the trained vocabulary.
CHATML_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<think>", False),
    ("</think>", False),
]
DEEPSEEK_ADDED_TOKENS = [(DEEPSEEK_BOS, True), (DEEPSEEK_EOS, True)]


def write_tokenizer_files(out_dir: str | Path, style: str = "chatml") -> int:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja; return the vocab size."""
    if style not in ("chatml", "deepseek"):
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'chatml' or 'deepseek'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(style)
    added = CHATML_ADDED_TOKENS if style == "chatml" else DEEPSEEK_ADDED_TOKENS
    config = _chatml_config(tokenizer, added) if style == "chatml" else _deepseek_config(tokenizer, added)
    template = CHATML_TEMPLATE if style == "chatml" else DEEPSEEK_TEMPLATE
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    return tokenizer.get_vocab_size(with_added_tokens=True)


def build_tokenizer(style: str) -> Tokenizer:
    """Train the byte-level BPE for `style` and append its added tokens."""
    tokenizer = Tokenizer(models.BPE())
    if style == "chatml":
        tokenizer.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(DEEPSEEK_CJK_SPLIT), behavior="isolated"),
            pre_tokenizers.Split(Regex(DEEPSEEK_DIGIT_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    added = CHATML_ADDED_TOKENS if style == "chatml" else DEEPSEEK_ADDED_TOKENS
    for content, special in added:
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    if style == "chatml":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        # The BOS lives in the post-processor: transformers 5 drops tokenizer_config's add_bos_token
        # whenever tokenizer.json exists, so this is what makes every encode start with BOS.
        bos_id = tokenizer.token_to_id(DEEPSEEK_BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{DEEPSEEK_BOS}:0 $A:0",
            pair=f"{DEEPSEEK_BOS}:0 $A:0 {DEEPSEEK_BOS}:1 $B:1",
            special_tokens=[(DEEPSEEK_BOS, bos_id)],
        )
    return tokenizer


def _added_tokens_decoder(tokenizer: Tokenizer, added: list[tuple[str, bool]]) -> dict:
    return {
        str(tokenizer.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in added
    }


def _chatml_config(tokenizer: Tokenizer, added: list[tuple[str, bool]]) -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer, added),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _deepseek_config(tokenizer: Tokenizer, added: list[tuple[str, bool]]) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer, added),
        "bos_token": DEEPSEEK_BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": DEEPSEEK_EOS,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": DEEPSEEK_EOS,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
    }
