"""Benchmark prompts: generated text that the timed run tokenizes, its ids spread over the preset's vocabulary."""

import random

from krasis.common.tokenizer import Tokenizer
from krasis.common.tokenizer.builder import CORPUS


def prompt_text(tokenizer: Tokenizer, tokens: int, seed: int) -> str:
    """The shortest text of at least `tokens` tokens from the tokenizer corpus's words in a seeded random order (so
    a timed tokenization encodes the prompt, not a longer text that is cut after)."""
    corpus, rng = CORPUS.split(), random.Random(seed)
    words: list[str] = []
    count = lambda n: len(tokenizer.encode(" " + " ".join(words[:n]), add_special_tokens=False))  # noqa: E731
    while count(len(words)) < tokens:  # a word is at least one token
        words += [rng.choice(corpus) for _ in range(max(64, tokens // 2))]
    low, high = 1, len(words)  # the fewest words that make `tokens` tokens
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(middle) < tokens else (low, middle)
    return " " + " ".join(words[:low])


def tokenize_prompt(tokenizer: Tokenizer, text: str, tokens: int, vocab_size: int) -> list[int]:
    """The first `tokens` ids of `text`, spread over the model's vocabulary (the tokenizer's is smaller)."""
    stride = max(1, vocab_size // tokenizer.vocab_size)
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return [token * stride for token in ids]
