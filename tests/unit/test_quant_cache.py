"""The quantized cache is built once, reused untouched, shared by concurrent starts, and never used
when stale, truncated or corrupt; experts are stacked per layer whatever the checkpoint layout."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from krasis.common.quant import cache_build as build_module
from krasis.common.quant.cache import HEADER_FILE, CacheError, ensure_cache, open_cache
from krasis.common.quant.formats import quantize
from krasis.common.quant.plan import QuantPlan, plan_items, role_of
from krasis.common.weights.checkpoint import CheckpointError
from krasis.common.weights.checkpoint_writer import save_sharded
from krasis.ctl.prepare import prepare

HIDDEN, INTER, EXPERTS, VOCAB, LAYERS = 64, 32, 4, 48, 2
PLAN = QuantPlan.parse("q4", "q8:g32")  # tiny widths: groups of 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_tensors(seed: int = 0, hidden: int = HIDDEN, inter: int = INTER) -> dict[str, torch.Tensor]:
    """A qwen3_moe-shaped checkpoint in bf16 with one tensor per expert and projection."""
    gen = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(VOCAB, hidden)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = 1 + weight(hidden)
        tensors.update({f"{prefix}self_attn.{p}.weight": weight(hidden, hidden) for p in PROJECTIONS})
        tensors[prefix + "mlp.gate.weight"] = weight(EXPERTS, hidden)
        for e in range(EXPERTS):
            tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = weight(inter, hidden)
            tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = weight(inter, hidden)
            tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = weight(hidden, inter)
    tensors["model.norm.weight"] = 1 + weight(hidden)
    tensors["lm_head.weight"] = weight(VOCAB, hidden)
    return tensors


def stacked_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights as transformers-5 checkpoints store them: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    out = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]]) for e in range(EXPERTS)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(EXPERTS)])
    return out


def write_checkpoint(model_dir: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    save_sharded(tensors, model_dir, max_shard_bytes=60_000)  # several shards, layers split across them
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", **(config or {})}))
    return model_dir


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "tiny-moe", tiny_tensors())


def file_stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.iterdir())}


def test_cache_stacks_experts_and_quantizes_per_plan(model_dir, tmp_path):
    source = tiny_tensors()
    reader = open_cache(ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False))
    stacked = stacked_layout(source)
    for layer in range(LAYERS):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            expected = quantize(stacked[name], PLAN.experts)
            got = reader.quantized(name)
            assert got.shape == tuple(stacked[name].shape) and got.spec == PLAN.experts
            assert torch.equal(got.qweight, expected.qweight) and torch.equal(got.scales, expected.scales)
        q_proj = reader.quantized(f"model.layers.{layer}.self_attn.q_proj.weight")
        assert q_proj.spec == PLAN.dense
    for kept in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(reader.get(kept), source[kept]) and reader.get(kept).dtype == torch.bfloat16
    assert "lm_head.weight" in reader.quantized_names
    assert not [n for n in reader.names if ".experts.0." in n]
    # views of one shared mapping, not copies
    assert reader.get("model.embed_tokens.weight").data_ptr() == reader.get("model.embed_tokens.weight").data_ptr()


def test_per_expert_and_stacked_sources_give_the_same_cache(tmp_path):
    per_expert = write_checkpoint(tmp_path / "a" / "tiny-moe", tiny_tensors())
    stacked = write_checkpoint(tmp_path / "b" / "tiny-moe", stacked_layout(tiny_tensors()))
    first = open_cache(ensure_cache(per_expert, PLAN, tmp_path / "cache-a", progress=False))
    second = open_cache(ensure_cache(stacked, PLAN, tmp_path / "cache-b", progress=False))
    assert sorted(first.names) == sorted(second.names)
    for name in first.names:
        assert torch.equal(first.get(name).view(torch.uint8), second.get(name).view(torch.uint8)), name


def test_second_ensure_cache_reuses_the_cache_untouched(model_dir, tmp_path, monkeypatch):
    path = ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False)
    before = file_stats(path)
    monkeypatch.setattr(build_module, "build_cache", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    assert ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False) == path
    open_cache(path, model_dir)
    assert file_stats(path) == before


def build_in_child(model_dir: Path, root: Path, log: Path, barrier) -> None:
    """A separate process starting on the same checkpoint; logs each build it runs."""
    original = build_module.build_cache

    def logged_build(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to reach the lock
        return original(*args, **kwargs)

    build_module.build_cache = logged_build
    barrier.wait()
    ensure_cache(model_dir, PLAN, root, progress=False)


def test_two_concurrent_starts_build_the_cache_once(model_dir, tmp_path):
    spawn = multiprocessing.get_context("spawn")
    barrier, log = spawn.Barrier(2), tmp_path / "builds.log"
    children = [spawn.Process(target=build_in_child, args=(model_dir, tmp_path / "cache", log, barrier)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [c.exitcode for c in children] == [0, 0]
    assert len(log.read_text().split()) == 1
    open_cache(ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False), verify=True)


def test_truncated_cache_file_is_refused_then_rebuilt(model_dir, tmp_path):
    path = ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False)
    layer_file = path / "model.layers.001.safetensors"
    size = layer_file.stat().st_size
    os.truncate(layer_file, size - 100)
    with pytest.raises(CacheError, match="model.layers.001.safetensors is .* bytes, the header says .*truncated"):
        open_cache(path)
    assert ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False) == path
    assert layer_file.stat().st_size == size
    open_cache(path, verify=True)


def flip_data_byte(path: Path) -> None:
    """Corrupt one byte of tensor data, then put the mtime back as a careless copy tool might."""
    file = path / "model.layers.000.safetensors"
    stat = file.stat()
    with open(file, "r+b") as f:
        f.seek(stat.st_size - 1000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def edit_header(path: Path) -> None:
    header = json.loads((path / HEADER_FILE).read_text())
    header["plan"]["dense"] = "bf16"
    (path / HEADER_FILE).write_text(json.dumps(header))


@pytest.mark.parametrize(
    "corrupt, message", [(flip_data_byte, "fails its sha256 checksum"), (edit_header, "fails its checksum")]
)
def test_corrupted_cache_is_detected_then_rebuilt(model_dir, tmp_path, corrupt, message):
    path = ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False)
    open_cache(path)  # verified once: later opens only hash what changed since
    corrupt(path)
    with pytest.raises(CacheError, match=message):
        open_cache(path)
    assert ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False) == path
    open_cache(path, verify=True)


def change_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))


def change_weights(model_dir: Path) -> None:
    for file in model_dir.glob("*.safetensors"):
        file.unlink()
    (model_dir / "model.safetensors.index.json").unlink()
    save_sharded(tiny_tensors(seed=1), model_dir, max_shard_bytes=60_000)


@pytest.mark.parametrize("change", [change_config, change_weights])
def test_stale_cache_is_refused_and_rebuilt_from_the_new_source(model_dir, tmp_path, change):
    old = ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False)
    change(model_dir)
    with pytest.raises(CacheError, match="stale"):
        open_cache(old, model_dir)
    new = ensure_cache(model_dir, PLAN, tmp_path / "cache", progress=False)
    assert new != old and not old.exists()
    embed = open_cache(new, model_dir).get("model.embed_tokens.weight")
    assert torch.equal(embed, tiny_tensors(seed=1 if change is change_weights else 0)["model.embed_tokens.weight"])


def test_cache_root_defaults_to_krasis_cache_dir(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KRASIS_CACHE_DIR", str(tmp_path / "from-env"))
    path = ensure_cache(model_dir, PLAN, progress=False)
    assert path.parent == tmp_path / "from-env" and path.name.startswith("tiny-moe-q4g32-q8g32-")


def test_layer_with_a_missing_expert_projection_is_a_clear_error():
    shapes = {n: t.shape for n, t in tiny_tensors().items() if n.startswith("model.layers.0.")}
    del shapes["model.layers.0.mlp.experts.2.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.experts.2.up_proj.weight is missing"):
        plan_items(list(shapes), shapes.__getitem__)


@pytest.mark.parametrize(
    "name, shape, role",
    [
        ("model.layers.0.mlp.experts.3.down_proj.weight", (64, 32), "expert"),
        ("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 64), "expert"),
        ("model.layers.0.mlp.shared_experts.up_proj.weight", (64, 64), "expert"),
        ("model.layers.0.mlp.shared_expert.down_proj.weight", (64, 64), "expert"),
        ("model.layers.0.self_attn.kv_b_proj.weight", (256, 32), "dense"),
        ("model.layers.0.mlp.gate_proj.weight", (96, 64), "dense"),
        ("model.layers.0.linear_attn.in_proj_qkvz.weight", (96, 64), "dense"),
        ("lm_head.weight", (48, 64), "dense"),
        ("model.embed_tokens.weight", (48, 64), "keep"),
        ("model.layers.0.mlp.gate.weight", (4, 64), "keep"),
        ("model.layers.0.mlp.shared_expert_gate.weight", (1, 64), "keep"),
        ("model.layers.0.self_attn.kv_a_layernorm.weight", (32,), "keep"),
        ("model.layers.0.self_attn.q_proj.bias", (64,), "keep"),
        ("model.layers.0.linear_attn.conv1d.weight", (96, 1, 4), "keep"),
    ],
)
def test_role_of_sorts_weights_into_experts_dense_and_kept(name, shape, role):
    assert role_of(name, shape) == role


def test_prepare_builds_then_reports_the_existing_cache(model_dir, tmp_path):
    args = ["--model", str(model_dir), "--quant", "q4", "--dense", "q8:g32", "--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(prepare, args)
    assert first.exit_code == 0, first.output
    path = Path(first.stdout.splitlines()[0])
    assert (path / HEADER_FILE).is_file()
    assert "built" in first.stdout and "GB/s" in first.stdout
    second = CliRunner().invoke(prepare, args)
    assert second.exit_code == 0 and second.stdout.splitlines()[0] == str(path)
    assert "reused" in second.stdout


@pytest.mark.parametrize(
    "quant, dense, message",
    [("q5", "bf16", "quant spec 'q5'"), ("q4", "q8", "K=64, which must be a positive multiple of the group size 128")],
)
def test_prepare_fails_with_one_line(model_dir, tmp_path, quant, dense, message):
    args = ["--model", str(model_dir), "--quant", quant, "--dense", dense, "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(prepare, args)
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
