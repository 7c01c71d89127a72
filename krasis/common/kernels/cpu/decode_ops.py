"""The decode-step kernels of decode_ops.cpp: attention of one query per head over cached rows (the context split
across threads), RMSNorm with the residual add before it, DeepSeek's interleaved rotary.

Built on first use with -march=native into torch's extensions cache, named after the CPU model and the source, as
the quant kernels are. Each op returns None for an input it does not take (a dtype, a layout); `ops()` is None where
the extension cannot be built. Either way the callers keep their torch formulas.
"""

import functools
import hashlib
import platform
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("decode_ops.cpp")


def _cpu_tag() -> str:
    """A -march=native binary must not be loaded on another CPU model."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return hashlib.sha1(model.encode()).hexdigest()[:8]


def build_extension():
    """Compile (or reuse the cached build of) decode_ops.cpp; returns its torch.ops namespace."""
    from torch.utils import cpp_extension

    name = f"krasis_decode_{_cpu_tag()}_{hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:6]}"
    flags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", f"-DKRASIS_OPS_NS={name}"]
    cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)  # fmt: skip
    return getattr(torch.ops, name)


@functools.cache
def ops():
    """The compiled ops, built once per process; None when they cannot be built here."""
    try:
        return build_extension()
    except Exception as exc:  # noqa: BLE001 - any build failure means: keep the torch formulas
        errors = [line.strip() for line in str(exc).splitlines() if "error:" in line] or [type(exc).__name__]
        warnings.warn(f"krasis: CPU decode kernels unavailable ({errors[0][:200]}); using torch ops", stacklevel=2)
        return None


_NO_SLOTS = torch.empty(0, dtype=torch.long)
HEADS_MATMUL_MAX_ROWS = 16  # the kernel reads each weight once per row block; a prefill chunk goes to torch.bmm


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], ends: list[int],
                     scale: float, slots: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """One query per head for each of B sequences: q [B, Hq, D] over k [N, Hkv, D], v [N, Hkv, Dv] (views of a
    cache layer, unit last stride), sequence b attending cache rows [starts[b], ends[b]), or rows
    slots[starts[b]:ends[b]] given int64 `slots` -> [B, Hq, Dv] in q's dtype. Softmax in fp32 over scores
    rounded to q's dtype, as a matmul in that dtype rounds them. None where the kernel does not take the inputs."""
    kernels = ops()
    if kernels is None:
        return None
    return kernels.decode_attention(q, k, v, _NO_SLOTS if slots is None else slots, starts, ends, scale)


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
