"""Benchmark prompts: generated text that the timed run tokenizes, its ids spread over the preset's vocabulary."""

import random

from krasis.common.tokenizer import Tokenizer
from krasis.common.tokenizer.builder import CORPUS


def prompt_text(tokenizer: Tokenizer, tokens: int, seed: int) -> str:
    """Text of at least `tokens` tokens: the tokenizer corpus's words in a seeded random order."""
    words, rng = CORPUS.split(), random.Random(seed)
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < tokens:  # a word is at least one token
        text += " " + " ".join(rng.choice(words) for _ in range(max(64, tokens // 2)))
    return text


def tokenize_prompt(tokenizer: Tokenizer, text: str, tokens: int, vocab_size: int) -> list[int]:
    """The first `tokens` ids of `text`, spread over the model's vocabulary (the tokenizer's is smaller)."""
    stride = max(1, vocab_size // tokenizer.vocab_size)
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return [token * stride for token in ids]
