"""Dequantize q8/q4 weights (krasis.common.quant.formats) into bf16/fp16/fp32 on the device.

On CUDA a Triton kernel writes q * scale (exact in fp32, rounded once to the output dtype, so it equals
formats.dequantize bit for bit); elsewhere, or without Triton, formats.dequantize itself runs."""

import functools

import torch

from krasis.common.quant.formats import QuantizedWeight, dequantize

BLOCK_ROWS = 16
BLOCK_COLS = 128  # packed bytes (q4) or values (q8) per program along K


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor) -> torch.Tensor:
    """out: contiguous [..., N, K] float tensor of qw.shape on qw's device; returns it filled."""
    if tuple(out.shape) != qw.shape or not out.is_contiguous():
        raise ValueError(f"dequantize_into: out {tuple(out.shape)} must be a contiguous {qw.shape} tensor")
    kernels = _triton_kernels() if out.is_cuda else None
    if kernels is None:
        return out.copy_(dequantize(qw, out.dtype))
    _launch(kernels, qw, out)
    return out


def _launch(kernels, qw: QuantizedWeight, out: torch.Tensor) -> None:
    k = qw.shape[-1]
    rows = out.numel() // k
    group = qw.spec.group_for(k)
    cols = k // 2 if qw.spec.format == "q4" else k
    grid = (triton_cdiv(rows, BLOCK_ROWS), triton_cdiv(cols, BLOCK_COLS))
    kernel = kernels[qw.spec.format]
    kernel[grid](qw.qweight, qw.scales, out, rows, cols, k // group, GROUP=group, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _triton_kernels():
    """{"q4": kernel, "q8": kernel}, or None when Triton is not installed (the torch path runs then)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequant_q4(q_ptr, s_ptr, out_ptr, rows, packed_k, groups, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
        # q: uint8 [rows, packed_k], s: [rows, groups], out: [rows, 2 * packed_k]
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
        p = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (r < rows) & (p < packed_k)
        r = r.to(tl.int64)
        byte = tl.load(q_ptr + r * packed_k + p, mask=mask, other=0).to(tl.int32)
        scale = tl.load(s_ptr + r * groups + (2 * p) // GROUP, mask=mask, other=0).to(tl.float32)
        low = ((byte & 15) - 8).to(tl.float32) * scale
        high = ((byte >> 4) - 8).to(tl.float32) * scale
        dst = out_ptr + r * (2 * packed_k) + 2 * p
        tl.store(dst, low.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 1, high.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def dequant_q8(q_ptr, s_ptr, out_ptr, rows, k, groups, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
        # q: int8 [rows, k], s: [rows, groups], out: [rows, k]
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
        c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (r < rows) & (c < k)
        r = r.to(tl.int64)
        q = tl.load(q_ptr + r * k + c, mask=mask, other=0).to(tl.float32)
        scale = tl.load(s_ptr + r * groups + c // GROUP, mask=mask, other=0).to(tl.float32)
        tl.store(out_ptr + r * k + c, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)

    return {"q4": dequant_q4, "q8": dequant_q8}


def triton_available() -> bool:
    return _triton_kernels() is not None
