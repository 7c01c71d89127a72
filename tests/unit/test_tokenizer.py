"""Tokenizer gives transformers' ids, text, eos ids and vocab size; the builder is deterministic."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from krasis.common.tokenizer import Tokenizer, TokenizerError, write_tokenizer_files
from krasis.common.tokenizer.builder import DEEPSEEK_BOS
from tests.unit.tokenizer_fixtures import (  # noqa: F401 (fixtures)
    MODEL_TYPES,
    SAMPLE_TEXTS,
    load_reference,
    model_dir,
    reference,
    style,
    tokenizer,
    write_model_dir,
)

TEXT_NAMES = list(SAMPLE_TEXTS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.mark.parametrize("text_name", TEXT_NAMES)
def test_encode_matches_transformers(tokenizer, reference, text_name):
    text = SAMPLE_TEXTS[text_name]
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text_name", TEXT_NAMES)
def test_decode_matches_transformers(tokenizer, reference, text_name, skip_special_tokens):
    ids = reference(SAMPLE_TEXTS[text_name])["input_ids"]
    expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
    assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected


def test_decode_round_trips_text(tokenizer):
    for text in SAMPLE_TEXTS.values():
        if "<" not in text:  # the special-token sample loses its specials when they are skipped
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_cjk_and_emoji_split_into_byte_fragments(tokenizer):
    # The detokenizer tests rely on characters spread over several tokens.
    for char in "鑫🦄":
        ids = tokenizer.encode(char, add_special_tokens=False)
        assert len(ids) > 1
        assert "\ufffd" in tokenizer.decode(ids[:1])


def test_bos_added_only_by_deepseek_style(tokenizer, style):
    ids = tokenizer.encode("Hi there")
    if style == "deepseek":
        assert ids[0] == tokenizer.bos_token_id == tokenizer.token_to_id(DEEPSEEK_BOS)
        assert ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.encode("") == [tokenizer.bos_token_id]
    else:
        assert tokenizer.bos_token_id is None
        assert tokenizer.encode("") == []
    assert ids[-1] not in tokenizer.eos_token_ids


def test_vocab_size_matches_transformers_and_builder(tokenizer, reference, model_dir, tmp_path, style):
    assert tokenizer.vocab_size == len(reference)
    assert write_tokenizer_files(tmp_path, style=style) == tokenizer.vocab_size
    assert 400 <= tokenizer.vocab_size <= 1000


def test_eos_ids_from_tokenizer_config(tokenizer, reference):
    assert tokenizer.eos_token_ids == {reference.eos_token_id}


def test_eos_ids_union_generation_config(tmp_path, style):
    write_model_dir(tmp_path, style, MODEL_TYPES[style])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": MODEL_TYPES[style], "eos_token_id": 9}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    own_eos = tokenizer.token_to_id(json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"])
    # config.json is only a fallback when generation_config.json names no eos
    assert tokenizer.eos_token_ids == {3, 4, own_eos}


def test_eos_ids_fall_back_to_config_json(tmp_path, style):
    write_model_dir(tmp_path, style)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 7}}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert 7 in tokenizer.eos_token_ids and len(tokenizer.eos_token_ids) == 2


def test_matches_transformers_without_config_json(tmp_path, style):
    write_model_dir(tmp_path, style)
    reference = load_reference(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    for text in SAMPLE_TEXTS.values():
        assert tokenizer.encode(text) == reference(text)["input_ids"]


def test_special_token_ids_are_the_special_added_tokens(tokenizer, reference):
    # what decode(skip_special_tokens=True) drops: every special added token, named or not
    expected = {i for i, token in reference.added_tokens_decoder.items() if token.special}
    assert tokenizer.special_token_ids == expected
    assert set(reference.all_special_ids) <= expected


def test_builder_writes_identical_bytes_every_time(tmp_path, style):
    first = write_model_dir(tmp_path / "a", style)
    second = write_model_dir(tmp_path / "b", style)
    for name in TOKENIZER_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_builder_is_deterministic_across_processes(tmp_path, style):
    # Rust hash maps are seeded per process, so check a fresh interpreter too.
    write_model_dir(tmp_path / "here", style)
    script = (
        "import sys; from krasis.common.tokenizer import write_tokenizer_files; "
        f"write_tokenizer_files(sys.argv[1], style={style!r})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True, env=env, cwd=_repo_root())
    assert _digest(tmp_path / "here") == _digest(tmp_path / "there")


def test_builder_is_fast(tmp_path, style):
    start = time.perf_counter()
    write_tokenizer_files(tmp_path, style=style)
    assert time.perf_counter() - start < 2.0


def test_builder_rejects_unknown_style(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer style"):
        write_tokenizer_files(tmp_path, style="gpt2")


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json in"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_malformed_file_is_a_clear_error(tmp_path, name):
    write_model_dir(tmp_path, "chatml")
    (tmp_path / name).write_text("{not json")
    with pytest.raises(TokenizerError, match=name) as caught:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(caught.value)


def test_encode_rejects_non_text(tokenizer):
    with pytest.raises(TokenizerError, match="can only encode str"):
        tokenizer.encode([1, 2, 3])


def test_tokens_declared_only_in_config_are_added_like_transformers(tmp_path, style):
    size = write_tokenizer_files(tmp_path, style=style)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(size)] = {"content": "<extra>", "special": False, "normalized": False}
    config["unk_token"] = "<unk_x>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer, reference = Tokenizer.from_dir(tmp_path), load_reference(tmp_path)
    text = "a<extra>b <unk_x> c"
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert tokenizer.token_to_id("<extra>") == size and tokenizer.vocab_size == len(reference) == size + 2
    expected_text = reference.decode(reference(text)["input_ids"], skip_special_tokens=True)
    assert tokenizer.decode(tokenizer.encode(text)) == expected_text


def _digest(directory: Path) -> str:
    return hashlib.sha256(b"".join((directory / name).read_bytes() for name in TOKENIZER_FILES)).hexdigest()


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
