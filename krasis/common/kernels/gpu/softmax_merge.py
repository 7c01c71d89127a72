"""Blockwise attention's partial results merged in one pass (krasis.common.layers.attention.attend_chunk_blockwise).

Each block of keys gives an output normalised over that block and its log-sum-exp; two such results merge exactly:
lse = logaddexp(lse_a, lse_b), out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse), in fp32. torch spends six
passes over [H, Tq, Dv] on that (two fp32 copies, two scalings, the add, the final cast); the Triton kernel reads
both outputs once and writes the result once, the last merge straight in the [Tq, H, Dv] bf16 layout the callers
take. The two products are rounded before their sum (no FMA), as torch rounds them.
"""

import torch

MERGE_ROWS = 32  # query rows a program merges (all Dv columns of each)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
                   final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """out, block_out [1, H, Tq, Dv] (out: a block's output as attention gives it, or the running fp32 result of
    earlier merges), lse, block_lse [1, H, Tq, 1] fp32 -> (out, lse) over both blocks: out in fp32 [1, H, Tq, Dv] and
    its lse, or with `final` out [Tq, H, Dv] in block_out's dtype and lse None. May write into out and lse."""
    if triton is not None and out.is_cuda and out.shape[-1] in (64, 128, 256):
        return _merge_fused(out, lse, block_out, block_lse, final)
    merged = torch.logaddexp(lse, block_lse)
    out = out.float().mul_((lse - merged).exp_())
    out.add_(block_out.float().mul_((block_lse - merged).exp_()))
    if final:
        return out[0].transpose(0, 1).to(block_out.dtype), None
    return out, merged


def _merge_fused(out, lse, block_out, block_lse, final: bool):
    _, heads, queries, width = out.shape
    lse, block_lse = lse.reshape(heads, queries).contiguous(), block_lse.reshape(heads, queries).contiguous()
    if final:
        dst = torch.empty(queries, heads, width, dtype=block_out.dtype, device=out.device)
        dst_h, dst_t = width, heads * width
    else:
        dst = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
        dst_h, dst_t = dst.stride(1), dst.stride(2)
    for t in (out, block_out, dst):
        assert t.stride(-1) == 1, "merge_partials takes rows contiguous in Dv"
    grid = (triton.cdiv(queries, MERGE_ROWS), heads)
    _merge[grid](out, lse, block_out, block_lse, dst, queries, out.stride(1), out.stride(2), block_out.stride(1),
                 block_out.stride(2), dst_h, dst_t, FINAL=final, WIDTH=width, ROWS=MERGE_ROWS,
                 enable_fp_fusion=False)  # fmt: skip
    return (dst, None) if final else (dst, lse.view(1, heads, queries, 1))


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: torch merges
    triton = None

if triton is not None:

    @triton.jit
    def _merge(a_ptr, lse_ptr, b_ptr, b_lse_ptr, dst_ptr, T, a_h, a_t, b_h, b_t, dst_h, dst_t, FINAL: tl.constexpr,
               WIDTH: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        # rows t of head h: dst = a * exp(lse - m) + b * exp(b_lse - m), m = logaddexp(lse, b_lse); lse <- m
        h = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rows = t < T
        lse = tl.load(lse_ptr + h * T + t, mask=rows, other=0.0)
        b_lse = tl.load(b_lse_ptr + h * T + t, mask=rows, other=0.0)
        high = tl.maximum(lse, b_lse)
        merged = high + tl.log(1.0 + tl.exp(-tl.abs(lse - b_lse)))
        d = tl.arange(0, WIDTH)[None, :]
        t64 = t.to(tl.int64)[:, None]
        a = tl.load(a_ptr + h * a_h + t64 * a_t + d, mask=rows[:, None], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + h * b_h + t64 * b_t + d, mask=rows[:, None], other=0.0).to(tl.float32)
        result = a * tl.exp(lse - merged)[:, None] + b * tl.exp(b_lse - merged)[:, None]
        tl.store(dst_ptr + h * dst_h + t64 * dst_t + d, result.to(dst_ptr.dtype.element_ty), mask=rows[:, None])
        if not FINAL:
            tl.store(lse_ptr + h * T + t, merged, mask=rows)
