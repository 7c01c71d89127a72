"""The decode-step kernels of decode_ops.cpp: attention of one query per head over cached rows (the context split
across threads; bf16 products on AMX tiles where the CPU has them), RMSNorm with the residual add before it,
DeepSeek's interleaved rotary.

Built on first use with -march=native into torch's extensions cache, as the quant kernels are (`build.py`). Each op
returns None for an input it does not take (a dtype, a layout); `ops()` is None where the extension cannot be built.
Either way the callers keep their torch formulas.
"""

import functools
import hashlib
from pathlib import Path

import torch

from krasis.common.kernels.cpu.build import build_or_warn, cpu_tag, load_extension

_SOURCE = Path(__file__).with_name("decode_ops.cpp")
_HEADERS = (Path(__file__).with_name("amx_tiles.h"),)


def build_extension(defines: tuple[str, ...] = ()):
    """Compile (or reuse the cached build of) decode_ops.cpp with these macros defined (`NAME` or `NAME=VALUE`;
    tests build KRASIS_AMX_EMULATE); returns its torch.ops namespace."""
    digest = hashlib.sha1(b"".join(path.read_bytes() for path in (_SOURCE, *_HEADERS)) + repr(defines).encode())
    flags = ["-O3", "-march=native", "-ffp-contract=off", *(f"-D{define}" for define in defines)]
    return load_extension(f"krasis_decode_{cpu_tag()}_{digest.hexdigest()[:6]}", _SOURCE, flags)


@functools.cache
def ops():
    """The compiled ops, built once per process; None when they cannot be built here."""
    return build_or_warn(build_extension, "CPU decode kernels", "torch ops")


_NO_SLOTS = torch.empty(0, dtype=torch.long)
HEADS_MATMUL_MAX_ROWS = 16  # the kernel reads each weight once per row block; a prefill chunk goes to torch.bmm


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], ends: list[int],
                     scale: float, slots: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """One query per head for each of B sequences: q [B, Hq, D] over k [N, Hkv, D], v [N, Hkv, Dv] (views of a
    cache layer, unit last stride), sequence b attending cache rows [starts[b], ends[b]), or rows
    slots[starts[b]:ends[b]] given int64 `slots` -> [B, Hq, Dv] in q's dtype. Softmax in fp32 over scores
    rounded to q's dtype, as a matmul in that dtype rounds them; probabilities rounded to v's dtype before the
    weighted sum (fp32 sums), as the torch path rounds them. None where the kernel does not take the inputs."""
    kernels = ops()
    if kernels is None:
        return None
    return kernels.decode_attention(q, k, v, _NO_SLOTS if slots is None else slots, starts, ends, scale)


@functools.cache
def attention_on_tiles() -> bool:
    """Whether bf16 decode attention multiplies on AMX tiles on this CPU (False where the kernels are not built)."""
    kernels = ops()
    return kernels is not None and kernels.attention_on_tiles()


def heads_matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """Per head h: x [M, H, K] times w[h] ([H, K, N]), or times w[h]^T when `transposed` (w [H, N, K]), w a view with
    a unit last stride -> [M, H, N] in x's dtype, sums in fp32 (a batched matmul's roundings). Decode-sized: None
    for more than HEADS_MATMUL_MAX_ROWS rows (a batched GEMM does those better), or inputs the kernel does not take."""
    kernels = ops()
    if kernels is None or x.shape[0] > HEADS_MATMUL_MAX_ROWS:
        return None
    return kernels.heads_matmul(x, w, transposed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * round(x * rsqrt(mean(x^2) + eps)) in one call (x and weight of one dtype, fp32 or bf16), or None."""
    kernels = ops()
    return None if kernels is None else kernels.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y rounded to x's dtype, rms_norm of that sum) in one call, or None."""
    kernels = ops()
    if kernels is None:
        return None
    total, normed = kernels.add_rms_norm(x, y, weight, eps)
    return None if total is None else (total, normed)


def rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """`rotary.apply_rotary_interleaved` in one call (x [T, heads, d], tables fp32 [T, 1, d]), or None."""
    kernels = ops()
    return None if kernels is None else kernels.rotary_interleaved(x, cos, signed_sin)
