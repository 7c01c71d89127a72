"""The GPU expert kernels' choices that need no GPU: when quantized experts are dequantized ahead of their GEMMs,
and how many at a time."""

import torch

from krasis.common.kernels.gpu.dequant import DEQUANT_BLOCK_BYTES, experts_per_block
from krasis.common.kernels.gpu.fused_moe import DEQUANTIZE_FIRST_ROWS, dequantizes_first
from krasis.common.quant.formats import QuantSpec, quantize


def test_experts_are_dequantized_first_only_with_many_rows_an_expert_and_a_scratch():
    gate_up = quantize(torch.randn(16, 256, 128), QuantSpec.parse("q4"))
    rows = DEQUANTIZE_FIRST_ROWS * 16
    assert dequantizes_first(gate_up, rows, DEQUANT_BLOCK_BYTES)
    assert not dequantizes_first(gate_up, rows - 1, DEQUANT_BLOCK_BYTES)
    assert not dequantizes_first(gate_up, rows, 0)  # the VRAM plan held no scratch
    assert not dequantizes_first(torch.randn(16, 256, 128).bfloat16(), rows, DEQUANT_BLOCK_BYTES)  # bf16 already


def test_a_block_of_experts_fits_the_scratch():
    per_expert = 3 * 1408 * 2048 * 2  # DeepSeek-V2-Lite, bf16
    assert experts_per_block((64, 2816, 2048), 2, 256 << 20) == (256 << 20) // per_expert == 15
    assert experts_per_block((64, 2816, 2048), 2, 1) == 1  # at least one
    assert experts_per_block((4, 2816, 2048), 2, 256 << 20) == 4  # at most all
