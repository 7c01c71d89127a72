"""Dequantize q8/q4 weights (krasis.common.quant.formats) into bf16/fp16/fp32 on the device.

On CUDA a Triton kernel writes q * scale (exact in fp32, rounded once to the output dtype, so it equals
formats.dequantize bit for bit); elsewhere, or without Triton, formats.dequantize itself runs."""

import functools

import torch

from krasis.common.quant.formats import QuantizedWeight, dequantize

BLOCK_ROWS = 32
BLOCK_COLS = 128  # packed bytes (q4) or values (q8) per program along K
GROUP_BLOCK_BYTES = 256  # stored bytes per row of a program along K, in whole scale groups
DEQUANT_BLOCK_BYTES = 256 << 20  # bf16 scratch for one block of dequantized experts (both projections)


def experts_per_block(gate_up_shape, dtype_bytes: int = 2, block_bytes: int = DEQUANT_BLOCK_BYTES) -> int:
    """Experts of a [E, 2I, H] gate_up (and its [E, H, I] down) whose float weights fit `block_bytes`."""
    return max(1, min(gate_up_shape[0], block_bytes // expert_float_bytes(gate_up_shape, dtype_bytes)))


def block_scratch_bytes(gate_up_shape, dtype_bytes: int = 2, block_bytes: int = DEQUANT_BLOCK_BYTES) -> int:
    """Bytes of one block of dequantized experts (experts_per_block of them)."""
    return experts_per_block(gate_up_shape, dtype_bytes, block_bytes) * expert_float_bytes(gate_up_shape, dtype_bytes)


def expert_float_bytes(gate_up_shape, dtype_bytes: int) -> int:
    """One expert's gate_up [2I, H] and down [H, I] as floats of `dtype_bytes`."""
    _, two_inter, hidden = gate_up_shape
    return 3 * (two_inter // 2) * hidden * dtype_bytes


def dequantize_experts(weight: QuantizedWeight, e0: int, e1: int, out: torch.Tensor) -> torch.Tensor:
    """Experts [e0, e1) of a stacked [E, N, K] quantized weight into `out` (contiguous [e1 - e0, N, K])."""
    part = QuantizedWeight(weight.spec, (e1 - e0, *weight.shape[1:]), weight.qweight[e0:e1], weight.scales[e0:e1])
    return dequantize_into(part, out)


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
    q4 = qw.spec.format == "q4"
    stored = group // 2 if q4 else group  # bytes of one scale group
    if stored & (stored - 1) == 0:  # a power of two: whole groups per program, one scale load per group
        per_program = max(1, GROUP_BLOCK_BYTES // stored)
        grid = (triton_cdiv(rows, BLOCK_ROWS), triton_cdiv(k // group, per_program))
        kernels["groups"][grid](qw.qweight, qw.scales, out, rows, k // group, STORED=stored, GROUP=group, Q4=q4,
                                BLOCK_R=BLOCK_ROWS, BLOCK_G=per_program, num_warps=8)  # fmt: skip
        return
    cols = k // 2 if q4 else k
    grid = (triton_cdiv(rows, BLOCK_ROWS), triton_cdiv(cols, BLOCK_COLS))
    kernel = kernels[qw.spec.format]
    kernel[grid](qw.qweight, qw.scales, out, rows, cols, k // group, GROUP=group, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _triton_kernels():
    """{"q4": kernel, "q8": kernel, "groups": kernel (either format, power-of-two group bytes)}, or None when Triton
    is not installed (the torch path runs then)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequant_q4(q_ptr, s_ptr, out_ptr, rows, packed_k, groups, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
        # q: uint8 [rows, packed_k] (column 2j in byte j's low nibble), s: [rows, groups], out: [rows, 2 * packed_k]
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
        p = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (r < rows) & (p < packed_k)
        r = r.to(tl.int64)
        byte = tl.load(q_ptr + r * packed_k + p, mask=mask, other=0).to(tl.int32)
        scale = tl.load(s_ptr + r * groups + (2 * p) // GROUP, mask=mask, other=0).to(tl.float32)
        low = ((byte & 15) - 8).to(tl.float32) * scale
        high = ((byte >> 4) - 8).to(tl.float32) * scale
        values = tl.reshape(tl.join(low, high), (BLOCK_R, 2 * BLOCK_C))  # columns 2j, 2j + 1 side by side
        c = (tl.program_id(1) * 2 * BLOCK_C + tl.arange(0, 2 * BLOCK_C))[None, :]
        values = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r * (2 * packed_k) + c, values, mask=(r < rows) & (c < 2 * packed_k))

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

    @triton.jit
    def dequant_groups(q_ptr, s_ptr, out_ptr, rows, groups, STORED: tl.constexpr, GROUP: tl.constexpr,
                       Q4: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
        # q: [rows, groups * STORED] (q8 values, or q4 pairs with column 2j in byte j's low nibble), s: [rows, groups],
        # out: [rows, groups * GROUP]; a [BLOCK_R, BLOCK_G, STORED] tile, its scales [BLOCK_R, BLOCK_G, 1]
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None, None]
        g = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None]
        mask = (r < rows) & (g < groups)
        r = r.to(tl.int64)
        q = tl.load(q_ptr + r * groups * STORED + g * STORED + tl.arange(0, STORED)[None, None, :], mask=mask, other=0)
        scale = tl.load(s_ptr + r * groups + g, mask=mask, other=0).to(tl.float32)
        if Q4:
            byte = q.to(tl.int32)
            low = ((byte & 15) - 8).to(tl.float32) * scale
            high = ((byte >> 4) - 8).to(tl.float32) * scale
            values = tl.reshape(tl.join(low, high), (BLOCK_R, BLOCK_G * GROUP))  # columns 2j, 2j + 1 together
        else:
            values = tl.reshape(q.to(tl.float32) * scale, (BLOCK_R, BLOCK_G * GROUP))
        row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
        c = (tl.program_id(1) * BLOCK_G * GROUP + tl.arange(0, BLOCK_G * GROUP))[None, :]
        mask = (row < rows) & (c < groups * GROUP)
        tl.store(out_ptr + row.to(tl.int64) * groups * GROUP + c, values.to(out_ptr.dtype.element_ty), mask=mask)

    return {"q4": dequant_q4, "q8": dequant_q8, "groups": dequant_groups}


def triton_available() -> bool:
    return _triton_kernels() is not None
