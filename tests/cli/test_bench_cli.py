"""`krasis-ctl bench` on the tiny preset: runs end to end, every figure has a limit and a sane ratio; its random
weights make a valid cache whose model generates; bad presets and options are one-line errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from krasis.bench import BenchError
from krasis.bench import presets
from krasis.bench.random_weights import bench_model_dir, ensure_random_cache
from krasis.common.model_loader import load_model
from krasis.common.quant.cache import open_cache
from krasis.common.quant.plan import QuantPlan
from krasis.common.sampling import SamplingParams
from krasis.ctl.main import cli
from tests.models.test_generation import engine, run

TINY_RUN = ["--preset", "tiny", "--dtype", "fp32", "--prompt-tokens", "64,192", "--decode-context", "96",
            "--decode-tokens", "4", "--bandwidth-gib", "0.125", "--threads", "1"]  # fmt: skip
# one thread: on a small shared CI box, threads waiting for each other make every figure noise


@pytest.fixture(autouse=True)
def krasis_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "krasis-home"  # shared by the tests: the tiny cache is built once
    monkeypatch.setenv("KRASIS_HOME", str(home))
    monkeypatch.delenv("KRASIS_CACHE_DIR", raising=False)
    threads = torch.get_num_threads()
    yield home
    torch.set_num_threads(threads)  # --threads sets this process's torch threads


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["bench", *args])
    return result.exit_code, result.output


def test_tiny_preset_reports_every_figure_with_its_limit_and_ratio(tmp_path):
    code, output = invoke(*TINY_RUN, "--json", str(tmp_path / "bench.json"))
    assert code == 0, output
    report = json.loads((tmp_path / "bench.json").read_text())
    figures = {f["name"]: f for f in report["figures"]}
    assert set(figures) == {"prefill 64 tok/s", "TTFT 64", "TTFT 64, first of length", "prefill 192 tok/s", "TTFT 192",
                            "TTFT 192, first of length", "decode at 96 tok/s", "peak RSS"}  # fmt: skip
    for name, figure in figures.items():
        assert figure["value"] > 0 and figure["limit"] > 0 and figure["bound_by"], name
        assert 0 < figure["ratio"] <= 1.5, f"{name}: ratio {figure['ratio']} against {figure['bound_by']}"
        assert name in output, f"{name} missing from the table"
    assert report["limits"]["cpu_read_gbs_best"] > 0
    assert set(report["limits"]["gemm_tflops"]) == {"64", "192"}
    assert report["timings"]["96"]["decode_tokens"] == 4
    assert report["timings"]["96"]["first_ttft_s"] is None  # a decode context only: prefilled once
    assert report["timings"]["192"]["first_ttft_s"] > 0
    assert sum(report["decode_bytes_per_token"]["96"].values()) > report["decode_bytes_per_token"]["96"]["lm_head"]


def test_random_weights_make_a_valid_cache_whose_model_generates(tmp_path):
    raw = presets.preset_config("tiny")
    plan = QuantPlan.parse("q8")
    model_dir = bench_model_dir("tiny", raw, seed=7, root=tmp_path / "models")
    path = ensure_random_cache(model_dir, plan, tmp_path / "quant")
    cache = open_cache(path, model_dir, verify=True)  # header, sizes and every sha256 check out
    assert not list(model_dir.glob("*.safetensors")), "no checkpoint on disk: only config and tokenizer"
    model = load_model(model_dir, dtype=torch.float32, quant=plan, cache_root=tmp_path / "quant")
    tokens = run(engine(model), {"a": [1, 2, 3, 4]}, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(tokens["a"]) == 5

    again = ensure_random_cache(bench_model_dir("tiny", raw, 7, tmp_path / "again"), plan, tmp_path / "quant2")
    other = ensure_random_cache(bench_model_dir("tiny", raw, 8, tmp_path / "other"), plan, tmp_path / "quant3")
    hashes = [[f["sha256"] for f in open_cache(p).header["files"]] for p in (path, again, other)]
    assert hashes[0] == hashes[1], "the same seed must give the same weights"
    assert hashes[0] != hashes[2], "another seed must give other weights"
    assert cache.header["build"]["source_bytes"] > cache.header["build"]["cache_bytes"] / 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'; presets: tiny, deepseek-v2-lite"),
        (["--preset", "tiny", "--layers", "9"], "--layers 9: preset 'tiny' has 1 to 2 layers"),
        (["--preset", "tiny", "--prompt-tokens", "2X"], "'2X' is not a token count"),
        (["--preset", "tiny", "--prompt-tokens", "32K"], "exceeds the preset's 16384-token context"),
        (["--preset", "tiny", "--quant", "q5"], "'q5' is not one of 'q4', 'q8'"),
    ],
)
def test_bad_preset_or_option_is_a_one_line_error(args, message):
    code, output = invoke(*args)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], output
    assert "Traceback" not in output


def test_preset_of_an_unregistered_architecture_says_so(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "future-moe", {"model_type": "future_moe", "num_hidden_layers": 4})
    with pytest.raises(BenchError, match="needs model_type 'future_moe', which this krasis does not support yet"):
        presets.preset_config("future-moe")
    code, output = invoke("--preset", "future-moe")
    assert code != 0 and output.strip().splitlines()[-1].startswith("Error: preset 'future-moe' needs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error():
    code, output = invoke("--preset", "tiny", "--device", "cuda")
    assert code != 0 and output.strip().splitlines() == ["Error: --device cuda: no CUDA GPU is available"]
