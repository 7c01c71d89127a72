"""Tokenizer directories for the tokenizer, chat, detokenizer and stop-string tests.

Import the fixtures by name into a test module. Byte-level directories come from our builder (with a
config.json, as in a real checkpoint, so transformers picks the same tokenizer class it would there);
the SentencePiece-style tokenizers are built here with byte fallback so CJK text becomes <0xNN> pieces.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from krasis.common.tokenizer import Tokenizer, write_tokenizer_files
from krasis.common.tokenizer.builder import CORPUS

STYLES = ("chatml", "deepseek")
MODEL_TYPES = {"chatml": "qwen3_moe", "deepseek": "deepseek_v2"}
SENTENCEPIECE_STYLES = ("llama_legacy", "metaspace")

SAMPLE_TEXTS = {
    "ascii": "Hello, world! The answer is 42.",
    "code": 'def add(a, b):\n    """Sum."""\n    return a + b  # 1,000 == 0x3E8\n\tx = {"k": [1, 2]}\n',
    # characters absent from the training corpus, so they stay split into byte tokens
    "cjk": "鑫龘齉，我们去爬山吧。東京の天気は晴れ。",
    "emoji": "🦄🧬 family: 👨‍👩‍👧 flag: 🇺🇳 ok👍🏽!",
    "mixed": "  Straße 你好 🙂  x\n\n  y\r\nz   ",
    "special_tokens": "before <|im_end|> mid <｜end▁of▁sentence｜> after<|endoftext|>",
    "empty": "",
}


def write_model_dir(out_dir: Path, style: str, model_type: str | None = None) -> Path:
    """Tokenizer files from the builder plus a minimal config.json naming the model type."""
    write_tokenizer_files(out_dir, style=style)
    if model_type is not None:
        (out_dir / "config.json").write_text(json.dumps({"model_type": model_type}))
    return out_dir


def load_reference(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session", params=STYLES)
def style(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_dir(style, tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp(f"tok-{style}"), style, MODEL_TYPES[style])


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def reference(model_dir):
    return load_reference(model_dir)


def build_sentencepiece_tokenizer(style: str) -> BackendTokenizer:
    """A Llama-like BPE over '▁' pieces with byte fallback: only ASCII is in the vocabulary."""
    vocab, merges = _train_ascii_pieces()
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    ordered = specials + byte_pieces + [piece for piece in vocab if piece not in specials]
    model = models.BPE(
        vocab={piece: i for i, piece in enumerate(ordered)},
        merges=merges,
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    tokenizer = BackendTokenizer(model)
    if style == "llama_legacy":
        # Llama-2 / DeepSeek-V1 tokenizer.json: spaces become '▁' in the normalizer, one stripped on decode
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)]
        )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def _train_ascii_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    trainer_tokenizer = BackendTokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False)
    ascii_lines = [line for line in CORPUS.splitlines() if line.isascii()]
    trainer_tokenizer.train_from_iterator(ascii_lines, trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    vocab = sorted(trained["vocab"], key=trained["vocab"].get)
    return vocab, [tuple(pair) for pair in trained["merges"]]


@pytest.fixture(scope="session", params=SENTENCEPIECE_STYLES)
def sentencepiece_tokenizer(request, tmp_path_factory) -> Tokenizer:
    out_dir = tmp_path_factory.mktemp(f"tok-{request.param}")
    build_sentencepiece_tokenizer(request.param).save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "TokenizersBackend"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(out_dir)
