"""Long texts encoded in pieces on several cores give exactly the serial encode's ids; tokenizers of an unknown
kind, unnormalized text and batch padding or truncation keep the serial path."""

import random
import unicodedata

import pytest
from tokenizers import normalizers, pre_tokenizers

from krasis.common.tokenizer import Tokenizer
from krasis.common.tokenizer.builder import CORPUS
from krasis.common.tokenizer.parallel import ParallelEncoder
from tests.unit.tokenizer_fixtures import (  # noqa: F401 (fixtures)
    SAMPLE_TEXTS,
    build_sentencepiece_tokenizer,
    model_dir,
    reference,
    style,
    tokenizer,
)

ODD_PIECES = [" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "'s", "'ll", "123", "4567", "x1", "é", "ß",
              "你好", "東京", "🙂", "👨‍👩‍👧", "..", "!?", "==", "(", ")", "_", "-", "<|im_end|>", "<|im_start|>",
              "<｜end▁of▁sentence｜>", "<|endoftext|>", *SAMPLE_TEXTS.values()]  # fmt: skip


def fuzz_text(seed: int, words: int = 3000) -> str:
    """Corpus words and odd pieces (whitespace runs, digits, contractions, CJK, emoji, added tokens) run together."""
    rng, corpus = random.Random(seed), CORPUS.split()
    parts = []
    for _ in range(words):
        parts.append(rng.choice(ODD_PIECES) if rng.random() < 0.2 else rng.choice(corpus))
        parts.append(rng.choice([" ", " ", " ", "", "\n", "  "]))
    return "".join(parts)


@pytest.mark.parametrize("seed", range(6))
def test_pieces_give_the_serial_ids(tokenizer, seed):
    encoder = ParallelEncoder.for_backend(tokenizer.backend, min_piece_chars=64, max_pieces=64)
    assert encoder is not None  # both test tokenizers are of the known kind
    text = unicodedata.normalize("NFC", fuzz_text(seed))  # (the NFC test tokenizer cuts normalized text only)
    cuts = encoder.cuts(text)
    assert len(cuts) >= 8 and cuts == sorted(set(cuts))
    assert encoder.encode(text) == tokenizer.backend.encode(text, add_special_tokens=False).ids


def test_long_texts_go_in_pieces_through_encode_with_transformers_ids(model_dir, reference):
    text = " ".join(random.Random(1).choice(CORPUS.split()) for _ in range(6000))
    tokenizer = Tokenizer.from_dir(model_dir)
    tokenizer._parallel.max_pieces = 4  # as on a 4-core machine (the default is this machine's core count)
    assert tokenizer._parallel.cuts(text)  # long enough to be cut at the default piece size
    for special in (False, True):
        ids = tokenizer.encode(text, add_special_tokens=special)
        assert ids == tokenizer.backend.encode(text, add_special_tokens=special).ids
        assert ids == reference(text, add_special_tokens=special)["input_ids"]


def test_cuts_stay_clear_of_added_tokens(model_dir):
    backend = Tokenizer.from_dir(model_dir).backend
    backend.add_tokens(["quick brown"])  # an added token with a letter-space-letter inside
    encoder = ParallelEncoder.for_backend(backend, min_piece_chars=32, max_pieces=64)
    text = "the quick brown fox jumps over the lazy dog and then runs far away into the wide green fields " * 40
    cuts = encoder.cuts(text)
    assert cuts and all("quick brown" not in text[cut - 12 : cut + 12] for cut in cuts)
    assert encoder.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_unnormalized_text_is_not_cut(tokenizer):
    encoder = ParallelEncoder.for_backend(tokenizer.backend, min_piece_chars=32, max_pieces=64)
    text = "cafe\u0301 " + "word word " * 100  # an e and a combining accent: NFC composes them
    if encoder.nfc:
        assert encoder.cuts(text) == []
    assert encoder.encode(text) in (None, tokenizer.backend.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("change", ["metaspace", "whitespace", "lowercase", "padding", "truncation", "prefix space"])
def test_other_pipelines_stay_serial(model_dir, change):
    backend = Tokenizer.from_dir(model_dir).backend
    if change == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
    elif change == "whitespace":
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    elif change == "lowercase":
        backend.normalizer = normalizers.Lowercase()
    elif change == "padding":
        backend.enable_padding()
    elif change == "truncation":
        backend.enable_truncation(512)
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert ParallelEncoder.for_backend(backend) is None


def test_sentencepiece_tokenizers_stay_serial():
    for kind in ("llama_legacy", "metaspace"):
        assert ParallelEncoder.for_backend(build_sentencepiece_tokenizer(kind)) is None
