"""Prefill's row-wise passes on the GPU as one Triton kernel each, where torch runs several over the whole chunk:
a bf16 RMSNorm and the residual add before it (torch: the add, an fp32 copy, the norm, the cast back, the weight's
product: five passes over [T, H], each ~25-45 us at an 8K chunk of V2-Lite on an H200), DeepSeek's interleaved
rotary in place (torch: an fp32 copy, the pair swap, two products, their sum, the cast back), and MLA's keys and
values laid out for attention from kv_b_proj's output and the shared rope key (torch: a cat with the key broadcast
to every head, then a copy of the values' strided view).

Each kernel rounds where torch's ops round: the sum to the activation dtype, the norm in fp32, its cast, then the
weight's product rounded; the rotary's two products in fp32, each rounded, then their sum (no FMA). The norm's sum of
squares runs in another order than torch's kernel (within an fp32 ulp of it, so within a bf16 rounding of it).
"""

import torch

NORM_ROWS = 4  # rows of [T, H] a program normalizes
ROTARY_ROWS = 16  # tokens a program rotates (all heads of each)
EXPAND_ROWS = 4  # tokens a program lays out (all heads of each)


def rowwise_runs(device) -> bool:
    """Whether this module's kernels run on `device` (a CUDA device, Triton installed)."""
    return triton is not None and torch.device(device).type == "cuda"


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether `rms_norm` runs for these: CUDA bf16/fp16 rows of contiguous elements, a contiguous weight and any
    residual of their dtype (and the residual of their shape), Triton present."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False  # the CPU paths (decode) leave here, after one attribute read
    residual_fits = residual is None or (
        residual.dtype == x.dtype and residual.shape == x.shape and residual.stride(-1) == 1)  # fmt: skip
    return (weight.dtype == x.dtype and weight.is_contiguous() and residual_fits and x.stride(-1) == 1
            and x.numel() > 0)  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * round(rms_norm(fp32 s)) for s = x (+ residual, rounded to x's dtype): -> normed, or (s, normed) with
    a residual. x, residual [..., H]; new contiguous outputs."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    add = residual.reshape(-1, hidden) if residual is not None else rows
    normed = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(normed) if residual is not None else normed
    grid = (triton.cdiv(rows.shape[0], NORM_ROWS),)
    _rms_norm[grid](rows, add, weight, total, normed, rows.shape[0], hidden, rows.stride(0), add.stride(0), eps,
                    ADD=residual is not None, ROWS=NORM_ROWS, WIDTH=triton.next_power_of_2(hidden),
                    enable_fp_fusion=False)  # fmt: skip
    if residual is None:
        return normed.view(x.shape)
    return total.view(x.shape), normed.view(x.shape)


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Whether `rotate_interleaved_` runs for these: CUDA x [T, heads, d] (d a power of 2, elements contiguous),
    contiguous fp32 tables [T, 1, d], Triton present."""
    dim = x.shape[-1]
    tables_fit = all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == (x.shape[0], 1, dim)
                     for t in (cos, signed_sin))  # fmt: skip
    return (triton is not None and x.is_cuda and x.dim() == 3 and x.stride(-1) == 1 and dim >= 2
            and dim & (dim - 1) == 0 and tables_fit and x.numel() > 0)  # fmt: skip


def rotate_interleaved_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated in place by pairs (2i, 2i + 1): (x * cos + swapped * signed_sin) per element, in fp32,
    rounded to x's dtype (krasis.common.layers.rotary.apply_rotary_interleaved's arithmetic) -> x."""
    tokens, heads, dim = x.shape
    grid = (triton.cdiv(tokens, ROTARY_ROWS),)
    _rotate[grid](x, cos, signed_sin, tokens, x.stride(0), x.stride(1), HEADS=heads,
                  HEADS_P2=triton.next_power_of_2(heads), DIM=dim, ROWS=ROTARY_ROWS,
                  enable_fp_fusion=False)  # fmt: skip
    return x


def expand_fits(kv: torch.Tensor, k_pe: torch.Tensor, nope: int, v_dim: int) -> bool:
    """Whether `expand_latent` runs for these: CUDA kv [n, heads * (nope + v)] contiguous, k_pe [n, rope] rows of
    contiguous elements, every width a power of 2, Triton present."""
    widths = (nope, v_dim, k_pe.shape[-1])
    return (triton is not None and kv.is_cuda and kv.is_contiguous() and k_pe.stride(-1) == 1
            and all(w & (w - 1) == 0 for w in widths) and kv.shape[0] > 0)  # fmt: skip


def expand_latent(kv: torch.Tensor, k_pe: torch.Tensor, heads: int, nope: int, v_dim: int):
    """kv [n, heads * (nope + v)] (each head's key part, then its value part), k_pe [n, rope] -> keys [n, heads,
    nope + rope] (each head's key part, then k_pe) and values [n, heads, v], both contiguous: copies only."""
    tokens, rope = kv.shape[0], k_pe.shape[-1]
    k = torch.empty(tokens, heads, nope + rope, dtype=kv.dtype, device=kv.device)
    v = torch.empty(tokens, heads, v_dim, dtype=kv.dtype, device=kv.device)
    grid = (triton.cdiv(tokens, EXPAND_ROWS),)
    _expand[grid](kv, k_pe, k, v, tokens, k_pe.stride(0), HEADS=heads, HEADS_P2=triton.next_power_of_2(heads),
                  NOPE=nope, ROPE=rope, V=v_dim, ROWS=EXPAND_ROWS)  # fmt: skip
    return k, v


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: torch's ops
    triton = None

if triton is not None:

    @triton.jit
    def _rms_norm(x_ptr, y_ptr, w_ptr, total_ptr, out_ptr, R, H, x_row, y_row, eps, ADD: tl.constexpr,
                  ROWS: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
        r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
        c = tl.arange(0, WIDTH)[None, :]
        live = (r < R) & (c < H)
        s = tl.load(x_ptr + r * x_row + c, mask=live, other=0.0)
        if ADD:
            s = (s.to(tl.float32) + tl.load(y_ptr + r * y_row + c, mask=live, other=0.0).to(tl.float32))
            s = s.to(total_ptr.dtype.element_ty)
            tl.store(total_ptr + r * H + c, s, mask=live)
        s = s.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / H + eps)
        normed = (s * scale[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * H + c, (w * normed).to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _rotate(x_ptr, cos_ptr, sin_ptr, T, x_t, x_h, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, DIM: tl.constexpr,
                ROWS: tl.constexpr):  # fmt: skip
        t = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]
        h = tl.arange(0, HEADS_P2)[None, :, None]
        d = tl.arange(0, DIM)[None, None, :]
        live = (t < T) & (h < HEADS)
        at = x_ptr + t * x_t + h * x_h
        x = tl.load(at + d, mask=live, other=0.0).to(tl.float32)
        swapped = tl.load(at + (d ^ 1), mask=live, other=0.0).to(tl.float32)  # (odd, even) per pair
        cos = tl.load(cos_ptr + t * DIM + d, mask=t < T, other=0.0)
        sin = tl.load(sin_ptr + t * DIM + d, mask=t < T, other=0.0)
        tl.store(at + d, (x * cos + swapped * sin).to(x_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _expand(kv_ptr, pe_ptr, k_ptr, v_ptr, T, pe_t, HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                NOPE: tl.constexpr, ROPE: tl.constexpr, V: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        t = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]
        h = tl.arange(0, HEADS_P2)[None, :, None]
        live = (t < T) & (h < HEADS)
        source = kv_ptr + t * (HEADS * (NOPE + V)) + h * (NOPE + V)
        key = k_ptr + t * (HEADS * (NOPE + ROPE)) + h * (NOPE + ROPE)
        d = tl.arange(0, NOPE)[None, None, :]
        tl.store(key + d, tl.load(source + d, mask=live), mask=live)
        d = tl.arange(0, ROPE)[None, None, :]
        pe = tl.load(pe_ptr + t * pe_t + d, mask=t < T)
        tl.store(key + NOPE + d, tl.broadcast_to(pe, (ROWS, HEADS_P2, ROPE)), mask=live)
        d = tl.arange(0, V)[None, None, :]
        tl.store(v_ptr + t * (HEADS * V) + h * V + d, tl.load(source + NOPE + d, mask=live), mask=live)
