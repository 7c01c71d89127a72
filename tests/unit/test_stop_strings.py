"""StopStringMatcher cuts at the first stop string wherever token or chunk boundaries fall."""

import random

import pytest

from krasis.common.tokenizer import IncrementalDetokenizer, StopStringMatcher
from tests.unit.tokenizer_fixtures import model_dir, style, tokenizer  # noqa: F401 (fixtures)


def feed_all(stop_strings, chunks) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop_strings)
    out, stopped = [], False
    for chunk in chunks:
        emitted, stopped = matcher.feed(chunk)
        out.append(emitted)
        if stopped:
            break
    out.append(matcher.flush())
    return "".join(out), stopped


def first_completed_cut(stop_strings, text) -> tuple[str, bool]:
    """Reference: read one character at a time and stop when any stop string has just completed."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop_strings if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def test_stop_string_spanning_feeds():
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.feed(" there\nUs") == (" there", False)
    assert matcher.feed("er: next question") == ("", True)
    assert matcher.matched == "\nUser:"
    assert matcher.flush() == ""


def test_stop_string_ending_inside_a_chunk():
    assert StopStringMatcher(["</s>"]).feed("answer</s>trailing text") == ("answer", True)


def test_stop_string_starting_at_a_chunk_end():
    assert feed_all(["STOP"], ["abc S", "TO", "P def"]) == ("abc ", True)


def test_text_after_stop_is_dropped():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a###b") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_first_completed_stop_string_wins():
    # "cd" completes before "abcdef" would, so the cut is at "cd" however the text is chunked
    assert feed_all(["abcdef", "cd"], ["abcdefg"]) == ("ab", True)
    assert feed_all(["abcdef", "cd"], list("abcdefg")) == ("ab", True)


def test_earlier_start_wins_when_two_complete_together():
    assert feed_all(["cd", "bcd"], ["xabcd"]) == ("xa", True)


def test_several_stop_strings_any_chunking_matches_reference():
    rng = random.Random(0)
    stops = ["\n\n", "User:", "</s>", "ab", "aab"]
    alphabet = ["a", "b", "\n", "User", ":", "</", "s>", " ", "x"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(1, 5))))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert feed_all(stops, chunks) == first_completed_cut(stops, text), (text, chunks)


def test_only_possible_prefixes_are_held_back():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("a<b") == ("a<b", False)  # "<b" cannot start "</s>"
    assert matcher.feed("c</") == ("c", False)
    assert matcher.feed("p>") == ("</p>", False)  # the held "</" was not a stop after all
    assert matcher.feed("end<") == ("end", False)
    assert matcher.flush() == "<"


def test_no_stop_strings_pass_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything </s>") == ("anything </s>", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_stop_ending_inside_a_streamed_token(tokenizer):
    # Decoded token text goes through the matcher; "\nUse" ends in the middle of the token "er".
    text = "The answer is 42.\nUser: and now 🦄?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    boundaries, offset = set(), 0
    for token_id in ids:
        offset += len(tokenizer.decode([token_id]))
        boundaries.add(offset)
    assert text.index("\nUse") + len("\nUse") not in boundaries  # otherwise the test proves nothing
    detokenizer, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(["\nUse"])
    out, stopped = [], False
    for token_id in ids:
        emitted, stopped = matcher.feed(detokenizer.add(token_id))
        out.append(emitted)
        if stopped:
            break
    assert stopped and "".join(out) == "The answer is 42."
