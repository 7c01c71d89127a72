"""Rotary position embeddings: default, linear and YaRN frequencies; half-split and interleaved rotation."""

import math

import torch

from krasis.common.kernels.cpu import decode_ops
from krasis.common.kernels.gpu import rowwise
from krasis.common.kv_cache import ForwardBatch
from krasis.common.model_config import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base, original_max = rope.theta, rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original_max
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    dim = int(head_dim * rope.partial_rotary_factor)
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim, max_position_embeddings)
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    return inv_freq, 1.0


class RotaryEmbedding:
    """cos/sin tables for given positions; computed in fp32 like the reference."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        self.inv_freq, self.attention_scaling = rope_inv_freq(rope, head_dim, max_position_embeddings)
        self._inv_freq_on = {self.inv_freq.device: self.inv_freq}  # copies kept per device

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, dim/2] in fp32
        freqs = positions[:, None].float() * self._inv_freq(positions.device)[None, :]
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        """inv_freq on `device`, copied there once: a copy from pageable memory waits for the copy engine, which
        a streaming prefill keeps busy with experts (11 ms at the start of every step, bench/stream_timeline.py)."""
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        return self._inv_freq_on[device]

    def half_tables(self, batch: ForwardBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tables for `apply_rotary_half`, built once a step for every layer."""
        build = lambda: half_tables(*self.cos_sin(batch.positions), dtype)  # noqa: E731
        return batch.per_step(("rotary_half", id(self), dtype), build)

    def interleaved_tables(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tables for `apply_rotary_interleaved`, built once a step for every layer."""
        build = lambda: interleaved_tables(*self.cos_sin(batch.positions))  # noqa: E731
        return batch.per_step(("rotary_interleaved", id(self)), build)


def half_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, r/2] -> cos [T, 1, r] and sin with the sign of the rotation [T, 1, r] (-sin, sin), in `dtype`."""
    return torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype)


def apply_rotary_half(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (i, i + r/2) (Llama/Qwen convention) of the first r dims, r the tables' width; the rest (partial
    rotary) pass through. x: [T, heads, d]; tables from `half_tables`. The reference's x * cos + cat(-x2, x1) * sin,
    with the sign in the table: the same products, bit for bit."""
    cos, signed_sin = tables
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary_half(x[..., :rotary_dim], tables), x[..., rotary_dim:]), dim=-1)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # cat(x2, x1)
    return x * cos + swapped * signed_sin


def interleaved_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, d/2] -> cos per dim [T, 1, d] and sin with the sign of the rotation [T, 1, d] (-sin, sin per
    pair), fp32."""
    return cos.repeat_interleave(2, dim=-1)[:, None, :], torch.stack((-sin, sin), dim=-1).flatten(-2)[:, None, :]


def apply_rotary_interleaved(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (2i, 2i + 1) (DeepSeek convention), in fp32. x: [T, heads, d]; tables from
    `interleaved_tables`. The reference's (even cos - odd sin, even sin + odd cos) per pair, bit for bit: the
    sign lives in the table and each output adds the same two rounded products. On the CPU one kernel call does the
    same arithmetic (each product rounded, no FMA) instead of eight ops."""
    cos, signed_sin = tables
    if x.is_cpu and (y := decode_ops.rotary_interleaved(x, cos, signed_sin)) is not None:
        return y
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (odd, even) per pair
    return (x32 * cos + swapped * signed_sin).to(x.dtype)


def rotate_interleaved_(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`apply_rotary_interleaved` in place (x may be a view, e.g. the rope part of whole queries) -> x. On a GPU one
    Triton pass (krasis.common.kernels.gpu.rowwise) instead of six torch ops and a copy."""
    cos, signed_sin = tables
    if rowwise.rotary_fits(x, cos, signed_sin):
        return rowwise.rotate_interleaved_(x, cos, signed_sin)
    return x.copy_(apply_rotary_interleaved(x, tables))
