"""FP8 e4m3 block-scaled checkpoints (weight + weight_scale_inv, as the official FP8 releases) load to
their bf16 originals within FP8 precision, and the cache consumes every scale."""

import json
import math
from pathlib import Path

import pytest
import torch

from krasis.common.quant.cache import ensure_cache, open_cache
from krasis.common.quant.formats import quantize
from krasis.common.quant.fp8 import DequantizingReader, dequantize_fp8, dequantized_tensors
from krasis.common.quant.plan import QuantPlan, role_of
from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader
from krasis.common.weights.checkpoint_writer import save_sharded
from tests.unit.test_quant_cache import stacked_layout, tiny_tensors

FP8_MAX = 448.0
# Widths that are no multiple of 128, so blocks at the edges are partial.
HIDDEN, INTER = 160, 96


def to_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], fp32 scale_inv [ceil(N/bn), ceil(K/bk)]), block max -> 448."""
    (n, k), (bn, bk) = weight.shape, block
    padded = torch.zeros(math.ceil(n / bn) * bn, math.ceil(k / bk) * bk)
    padded[:n, :k] = weight.float()
    blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale_inv = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    fp8 = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).view(padded.shape)
    return fp8[:n, :k].contiguous(), scale_inv


def fp8_checkpoint(model_dir: Path, original: dict[str, torch.Tensor], block: tuple[int, int]) -> Path:
    """As the official releases: linear weights in FP8 with scales; embeddings, norms, routers, lm_head in bf16."""
    tensors = {}
    for name, tensor in original.items():
        if role_of(name, tuple(tensor.shape)) == "keep" or name == "lm_head.weight":
            tensors[name] = tensor
        else:
            tensors[name], tensors[name + "_scale_inv"] = to_fp8_blocks(tensor, block)
    save_sharded(tensors, model_dir, max_shard_bytes=100_000)
    config = {"model_type": "qwen3_moe", "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def fp8_error_bound(original: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per element: e4m3 keeps 3 mantissa bits, so rounding a normal value (>= 2^-6 after scaling)
    moves it by at most 2^-4 of itself; below 2^-6 values are subnormal, spaced 2^-9 apart, so they
    move by at most 2^-10 in scaled units, i.e. 2^-10 * scale = 2^-10 * block max / 448. The fp32
    divide and multiply add ~2^-23 relative."""
    (n, k), (bn, bk) = original.shape, block
    _, scale_inv = to_fp8_blocks(original, block)
    scale = scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    x = original.float().abs()
    return 2**-4 * x + 2**-10 * scale + 2**-20 * x


@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_fp8_checkpoint_loads_to_its_bf16_original_within_fp8_precision(tmp_path, block):
    original = tiny_tensors(hidden=HIDDEN, inter=INTER)
    model_dir = fp8_checkpoint(tmp_path / "fp8", original, block)
    reader = CheckpointReader(model_dir)
    loaded = dict(dequantized_tensors(reader, json.loads((model_dir / "config.json").read_text())))
    assert sorted(loaded) == sorted(original)  # every weight_scale_inv consumed
    worst = 0.0
    for name, tensor in loaded.items():
        if reader.dtype(name) != torch.float8_e4m3fn:
            assert torch.equal(tensor, original[name])
            continue
        error = (tensor - original[name].float()).abs()
        bound = fp8_error_bound(original[name], block)
        assert (error <= bound).all(), name
        worst = max(worst, (error / bound).max().item())
    assert worst > 0.5  # the bound is tight, not slack by orders of magnitude


def test_dequantize_fp8_handles_stacked_experts_like_one_expert_at_a_time():
    gen = torch.Generator().manual_seed(0)
    experts = [torch.randn(200, 136, generator=gen) for _ in range(3)]
    pairs = [to_fp8_blocks(w, (128, 128)) for w in experts]
    stacked = dequantize_fp8(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), (128, 128))
    for e, (fp8, scale_inv) in enumerate(pairs):
        assert torch.equal(stacked[e], dequantize_fp8(fp8, scale_inv, (128, 128)))


def test_cache_from_fp8_holds_the_dequantized_weights_and_no_scales(tmp_path):
    model_dir = fp8_checkpoint(tmp_path / "fp8", tiny_tensors(hidden=HIDDEN, inter=INTER), (128, 128))
    config = json.loads((model_dir / "config.json").read_text())
    dequantized = stacked_layout(dict(dequantized_tensors(CheckpointReader(model_dir), config)))
    unquantized = open_cache(ensure_cache(model_dir, QuantPlan.parse("bf16"), tmp_path / "cache", progress=False))
    assert sorted(unquantized.names) == sorted(dequantized)
    for name, tensor in dequantized.items():
        assert torch.equal(unquantized.get(name), tensor.to(torch.bfloat16)), name
    q8 = open_cache(ensure_cache(model_dir, QuantPlan.parse("q8:g32"), tmp_path / "cache", progress=False))
    gate_up = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(q8.quantized(gate_up).qweight, quantize(dequantized[gate_up], q8.plan.experts).qweight)
    assert not [n for n in q8.names if "scale_inv" in n]


def test_fp8_weight_without_its_scale_is_a_clear_error(tmp_path):
    model_dir = fp8_checkpoint(tmp_path / "fp8", tiny_tensors(hidden=HIDDEN, inter=INTER), (128, 128))
    reader = CheckpointReader(model_dir)
    tensors = {n: reader.get(n) for n in reader.names if n != "model.layers.0.self_attn.o_proj.weight_scale_inv"}
    broken = tmp_path / "broken"
    save_sharded(tensors, broken)
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"FP8 tensor model.layers.0.self_attn.o_proj.weight has no .*_scale_inv"):
        DequantizingReader(CheckpointReader(broken), {})


def test_scale_of_the_wrong_block_grid_is_a_clear_error(tmp_path):
    model_dir = fp8_checkpoint(tmp_path / "fp8", tiny_tensors(hidden=HIDDEN, inter=INTER), (128, 128))
    wrong_block = {"quantization_config": {"weight_block_size": [64, 64]}}
    with pytest.raises(CheckpointError, match=r"_scale_inv has shape \(\d+, \d+\); .* in 64x64 blocks needs"):
        DequantizingReader(CheckpointReader(model_dir), wrong_block)
