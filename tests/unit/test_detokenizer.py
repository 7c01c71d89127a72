"""IncrementalDetokenizer streams whole characters and joins to exactly what decode gives."""

import random

import pytest

from krasis.common.tokenizer import IncrementalDetokenizer
from krasis.common.tokenizer.detokenizer import MAX_PENDING_TOKENS
from tests.unit.tokenizer_fixtures import (  # noqa: F401 (fixtures)
    SAMPLE_TEXTS,
    model_dir,
    sentencepiece_tokenizer,
    style,
    tokenizer,
)

STREAM_TEXTS = {
    "cjk": SAMPLE_TEXTS["cjk"],
    "emoji": SAMPLE_TEXTS["emoji"],
    "mixed": SAMPLE_TEXTS["mixed"] + " " + SAMPLE_TEXTS["code"],
    "leading_spaces": "   three spaces, then  two\n and a newline",
}


def stream(tokenizer, ids, prompt_ids=None, skip_special_tokens=True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    chunks = [detokenizer.add(token_id) for token_id in ids]
    return chunks + [detokenizer.flush()]


def assert_streams_cleanly(tokenizer, ids, skip_special_tokens=True):
    chunks = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return chunks


def has_byte_fragments(tokenizer, ids) -> bool:
    return any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)


@pytest.mark.parametrize("text_name", list(STREAM_TEXTS))
def test_byte_level_stream_never_splits_a_character(tokenizer, text_name):
    ids = tokenizer.encode(STREAM_TEXTS[text_name], add_special_tokens=False)
    if text_name in ("cjk", "emoji"):
        assert has_byte_fragments(tokenizer, ids)  # otherwise the test proves nothing
    assert_streams_cleanly(tokenizer, ids)


@pytest.mark.parametrize("text_name", list(STREAM_TEXTS))
def test_sentencepiece_stream_never_splits_a_character(sentencepiece_tokenizer, text_name):
    ids = sentencepiece_tokenizer.encode(STREAM_TEXTS[text_name])
    if text_name in ("cjk", "emoji"):
        assert has_byte_fragments(sentencepiece_tokenizer, ids)
    assert_streams_cleanly(sentencepiece_tokenizer, ids)


def test_sentencepiece_spaces_survive_token_boundaries(sentencepiece_tokenizer):
    ids = sentencepiece_tokenizer.encode("a b  c")
    chunks = assert_streams_cleanly(sentencepiece_tokenizer, ids)
    assert "".join(chunks) == "a b  c"
    # a word's '▁' becomes the space at the start of its own chunk instead of being stripped
    assert any(chunk.startswith(" ") for chunk in chunks)


def test_characters_are_released_as_soon_as_complete(tokenizer):
    ids = tokenizer.encode("🦄x", add_special_tokens=False)
    chunks = stream(tokenizer, ids)
    unicorn_done = next(i for i, chunk in enumerate(chunks) if chunk)
    assert chunks[unicorn_done].startswith("🦄")
    assert unicorn_done == len(tokenizer.encode("🦄", add_special_tokens=False)) - 1


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_flag(tokenizer, skip_special_tokens):
    messages = [{"role": "user", "content": "你好 🙂"}, {"role": "assistant", "content": "好的 👍 ok"}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    chunks = assert_streams_cleanly(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    eos_text = tokenizer.decode(sorted(tokenizer.eos_token_ids), skip_special_tokens=False)
    assert (eos_text in "".join(chunks)) is not skip_special_tokens


@pytest.mark.parametrize("seed", range(4))
def test_random_byte_level_ids_join_to_decode(tokenizer, seed):
    # Random ids make invalid and incomplete UTF-8 at every turn; the stream must still add up.
    rng = random.Random(seed)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(400)]
    for skip_special_tokens in (True, False):
        chunks = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_unfinished_character_is_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("ok🦄", add_special_tokens=False)[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.add(token_id) for token_id in ids)
    assert "\ufffd" not in streamed
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd") and streamed + tail == tokenizer.decode(ids)
    assert detokenizer.flush() == ""


def test_invalid_bytes_do_not_grow_the_window(tokenizer):
    lone_continuation = tokenizer.encode("🦄", add_special_tokens=False)[-1]
    ids = [lone_continuation] * (3 * MAX_PENDING_TOKENS)
    detokenizer = IncrementalDetokenizer(tokenizer)
    chunks = [detokenizer.add(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(chunks) == tokenizer.decode(ids)
    # the window holds at most the last emitted run plus the pending one
    assert len(detokenizer.ids) - detokenizer.prefix_offset <= 2 * MAX_PENDING_TOKENS + 1


def test_window_stays_small_on_long_streams(tokenizer):
    ids = tokenizer.encode(" ".join(STREAM_TEXTS.values()) * 20, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    widest = 0
    for token_id in ids:
        detokenizer.add(token_id)
        widest = max(widest, len(detokenizer.ids) - detokenizer.prefix_offset)
    assert len(ids) > 500 and widest <= 8


def test_prompt_context_keeps_leading_space(sentencepiece_tokenizer):
    prompt_ids = sentencepiece_tokenizer.encode("The capital of France is")
    full = sentencepiece_tokenizer.encode("The capital of France is Paris, 巴黎.")
    generated = full[len(prompt_ids) :]
    assert full[: len(prompt_ids)] == prompt_ids
    chunks = stream(sentencepiece_tokenizer, generated, prompt_ids=prompt_ids)
    # alone, decode drops the first '▁'; after the prompt it is a real space
    assert "".join(chunks) == " Paris, 巴黎."
    assert sentencepiece_tokenizer.decode(generated) == "Paris, 巴黎."
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_prompt_context_adds_nothing_for_byte_level(tokenizer):
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    generated = tokenizer.encode(" Hello 👋 there", add_special_tokens=False)
    assert "".join(stream(tokenizer, generated, prompt_ids=prompt_ids)) == tokenizer.decode(generated)


def test_add_after_flush_is_refused(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    detokenizer.flush()
    with pytest.raises(RuntimeError):
        detokenizer.add(0)
