"""`krasis-ctl generate`: JSON output equals transformers; errors are one line."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from krasis.ctl.main import cli
from tests.models.tiny_checkpoints import build_checkpoint, load_reference
from tests.models.test_generation import reference_greedy


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_checkpoint("qwen3_moe-base", tmp_path_factory.mktemp("cli-qwen"))


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return build_checkpoint("deepseek_v2-lite", tmp_path_factory.mktemp("cli-deepseek"))


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def generate_json(*args: str) -> dict:
    code, output = invoke("generate", "--json", "--dtype", "fp32", *args)
    assert code == 0, output
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["qwen", "deepseek"])
def test_json_prompt_ids_and_greedy_tokens_match_transformers(qwen_dir, deepseek_dir, which):
    model_dir = qwen_dir if which == "qwen" else deepseek_dir
    text = "def add(a, b):\n    return a + b  # 加法 🙂"
    out = generate_json("--model", str(model_dir), "--prompt", text, "--max-tokens", "16", "--ignore-eos")
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert out["prompt_token_ids"] == hf_tokenizer(text)["input_ids"]
    expected = reference_greedy(load_reference(model_dir), out["prompt_token_ids"], 16, eos=None)
    assert out["token_ids"] == expected
    assert out["text"] == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert out["finish_reason"] == "length"


def test_chat_prompt_renders_like_apply_chat_template(qwen_dir):
    out = generate_json("--model", str(qwen_dir), "--system", "Be brief.", "--chat", "Hi 👋", "--max-tokens", "2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    expected = AutoTokenizer.from_pretrained(qwen_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert out["prompt_token_ids"] == list(expected)


def test_stop_string_is_cut_and_reported(qwen_dir):
    free = generate_json("--model", str(qwen_dir), "--prompt", "hello", "--max-tokens", "24", "--ignore-eos")
    assert len(free["text"]) > 6
    stop = free["text"][3:5]
    out = generate_json("--model", str(qwen_dir), "--prompt", "hello", "--max-tokens", "24", "--ignore-eos",
                        "--stop", stop)
    assert out["finish_reason"] == "stop"
    assert out["text"] == free["text"][: free["text"].index(stop)]


def test_seeded_sampling_is_reproducible(qwen_dir):
    args = ("--model", str(qwen_dir), "--prompt", "abc", "--max-tokens", "16", "--temperature", "1.0",
            "--ignore-eos")
    first = generate_json(*args, "--seed", "7")
    assert generate_json(*args, "--seed", "7")["token_ids"] == first["token_ids"]
    assert generate_json(*args, "--seed", "8")["token_ids"] != first["token_ids"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "/nonexistent/model", "--prompt", "x"), "no config.json"),
        (("--prompt", "x", "--top-p", "3"), "top_p"),
        (("--prompt", "x", "--chat", "y"), "exactly one of --prompt and --chat"),
        (("--prompt", "x", "--max-tokens", "0"), "--max-tokens"),
    ],
)
def test_bad_input_is_a_one_line_error(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("KRASIS_HOME", str(tmp_path))
    code, output = invoke("generate", *args)
    assert code != 0
    error_lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and message in error_lines[0], output


def test_corrupt_checkpoint_is_a_one_line_error(qwen_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in qwen_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, output = invoke("generate", "--model", str(broken), "--prompt", "x")
    assert code == 1 and output.startswith("Error: ") and "truncated" in output
    assert len(output.strip().splitlines()) == 1


def test_console_script_runs_the_embedded_default_model(tmp_path):
    env = {**os.environ, "KRASIS_HOME": str(tmp_path)}
    script = os.path.join(os.path.dirname(sys.executable), "krasis-ctl")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "krasis.ctl"]
    run = subprocess.run(
        command + ["generate", "--chat", "Hello!", "--max-tokens", "8", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) + (out["finish_reason"] == "stop") >= 1
    assert (tmp_path / "models" / "krasis-tiny-moe-v1" / "config.json").is_file()
