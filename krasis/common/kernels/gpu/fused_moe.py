"""Routed experts at prefill sizes straight from q4/q8/bf16 weights as stored: two Triton GEMM kernels that
dequantize weight tiles in registers (no bf16 copy of the experts, no scratch), with the routing done on the
device (no host sync, so the host keeps enqueueing while the GPU works).

1. `align_by_expert`: the token x slot pairs sorted by expert, each expert's rows padded to a multiple of
   BLOCK_M, so every row block of BLOCK_M rows belongs to one expert;
2. gate/up kernel: h = act(x W_gate^T) * (x W_up^T) for each padded row (x rows gathered by token), [R, I];
3. down kernel: y = h W_down^T for each pair, written unpadded in pair order (token * k + slot), [T * k, H];
4. sum kernel: out[t] = sum over slots of y[t, s] * weight[t, s] in fp32, rounded once to the output dtype.

Dequantizing inside a GEMM tile costs the tensor cores their overlap (Triton waits for each tile's MMAs before the
next tile's unpacking), so a quantized GEMM runs at about half a bf16 one. With many rows an expert it pays to
dequantize first: a block of experts at a time into a bf16 scratch (one memory-bound pass over the weights), then
the bf16 kernels over that block's rows. That path learns each block's rows from one wait a call, for a pinned copy
the GPU makes while it dequantizes the first block.

Rounding follows StackedExperts: the GEMM outputs, the activation and the gated product are rounded to bf16 as
torch's bf16 ops round them; weights are q * scale exactly, rounded once to bf16 as `dequantize` does. A token's
slots are summed in slot order (the reference sums in expert order): within bf16 tolerance of the reference, and
deterministic, so a streamed and a resident run give the same bits.
"""

import itertools

import torch

from krasis.common.kernels.gpu.dequant import (
    DEQUANT_BLOCK_BYTES,
    dequantize_experts,
    expert_float_bytes,
    experts_per_block,
)
from krasis.common.quant.formats import QuantizedWeight

ACTIVATIONS = ("silu", "swish")  # the gated activations the kernel computes in place; others take the grouped path
DEQUANTIZE_FIRST_ROWS = 320  # rows an expert (on average) from which quantized experts are dequantized first


def fused_available(x: torch.Tensor, gate_up, act: str) -> bool:
    """Whether `fused_experts` runs for these inputs (CUDA, bf16 activations, Triton present)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and act in ACTIVATIONS and triton is not None and (
        isinstance(gate_up, QuantizedWeight) or gate_up.dtype == torch.bfloat16)  # fmt: skip


def block_rows(pairs: int, num_experts: int) -> int:
    """Rows of one block (one expert's tile height): large enough to feed the tensor cores, small enough that the
    padding of each expert's last block stays a small share of its rows."""
    average = pairs / max(1, num_experts)
    return 128 if average >= 384 else 64 if average >= 96 else 32 if average >= 32 else 16


def _capacity(pairs: int, num_experts: int, block_m: int) -> int:
    """Padded rows in the worst case: every used expert's last block nearly empty."""
    padded = pairs + min(num_experts, pairs) * (block_m - 1)
    return -(-padded // block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (rows [R] int32: the pair (token * k + slot) at each padded row, T * k at padding;
    block_expert [R / block_m] int32: each block's expert, num_experts for blocks past the last). Device ops only."""
    flat = topk_ids.reshape(-1)
    pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pairs by expert, tokens ascending within one
    expert = flat.index_select(0, order)
    first = counts.cumsum(0) - counts  # each expert's first sorted pair
    dest = (padded_ends - padded).index_select(0, expert) + torch.arange(pairs, device=device) - first.index_select(0, expert)
    capacity = _capacity(pairs, num_experts, block_m)
    rows = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    rows.index_copy_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, starts, right=True).to(torch.int32)
    return rows, block_expert


def fused_experts(x: torch.Tensor, gate_up, down, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  tiles: dict | None = None, block_m: int | None = None, dequantize_first: bool | None = None,
                  scratch_bytes: int = DEQUANT_BLOCK_BYTES) -> torch.Tensor:  # fmt: skip
    """x: [T, H] bf16 on CUDA; gate_up [E, 2I, H] and down [E, H, I] (QuantizedWeight or bf16); topk_* [T, k]
    -> [T, H] bf16: sum over k of weight * down(silu(gate(x)) * up(x)) of each selected expert. `tiles` overrides
    `pick_tiles` ({"gate_up": (BLOCK_N, BLOCK_K, warps, stages), "down": ...}: the benchmark's sweep), `block_m`
    the row-block height (`compile_kernels`), `dequantize_first` the choice of `dequantizes_first` for quantized
    weights, `scratch_bytes` the bf16 scratch of that path."""
    tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    top_k = topk_ids.shape[1]
    pairs = tokens * top_k
    block_m = block_m or block_rows(pairs, num_experts)
    rows, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    x = x.contiguous()
    h = torch.empty(rows.numel(), two_inter // 2, dtype=x.dtype, device=x.device)
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    routed = _Routed(x, rows, block_expert, h, y, pairs, top_k, block_m, tiles)
    if dequantize_first is None:
        dequantize_first = dequantizes_first(gate_up, pairs, scratch_bytes)
    if dequantize_first and isinstance(gate_up, QuantizedWeight):
        _dequantized_by_block(routed, gate_up, down, scratch_bytes)
    else:
        routed.gemms(gate_up, down, 0, block_expert.numel(), 0, num_experts)
    weights = topk_weights.reshape(-1).float().contiguous()
    _weighted_sum[(tokens, triton_cdiv(hidden, SUM_BLOCK))](y, weights, out, hidden, TOP_K=top_k, BLOCK_H=SUM_BLOCK)
    return out


def dequantizes_first(gate_up, pairs: int, scratch_bytes: int) -> bool:
    """Whether quantized experts are dequantized a block at a time before bf16 GEMMs (rather than tile by tile in
    the GEMMs): given a scratch, from DEQUANTIZE_FIRST_ROWS rows an expert on average, where the bf16 kernels'
    speed pays for one extra pass over the weights (bench/moe_kernels.py times both). The VRAM plan counts the
    scratch by the same rule (vram_plan.ActivationShape.chunk_bytes)."""
    quantized = isinstance(gate_up, QuantizedWeight)
    return quantized and scratch_bytes > 0 and pairs >= DEQUANTIZE_FIRST_ROWS * gate_up.shape[0]


class _Routed:
    """One call's routed rows and output buffers, and the launch of its two GEMM kernels over a range of blocks."""

    def __init__(self, x, rows, block_expert, h, y, pairs: int, top_k: int, block_m: int, tiles: dict | None):
        self.x, self.rows, self.block_expert, self.h, self.y = x, rows, block_expert, h, y
        self.pairs, self.top_k, self.block_m, self.tiles = pairs, top_k, block_m, tiles or {}

    def gemms(self, gate_up, down, block0: int, blocks: int, expert0: int, expert_end: int) -> None:
        """Row blocks [block0, block0 + blocks), whose experts lie in [expert0, expert_end): gate_up and down hold
        experts from expert0 on (all of a layer's, or a dequantized block of them)."""
        hidden, inter = self.x.shape[1], self.h.shape[1]
        fmt, group = _format(gate_up), _group(gate_up, hidden)
        n, k, warps, stages = self.tiles.get("gate_up") or pick_tiles("gate_up", fmt, group, hidden, self.block_m)
        _gate_up[(blocks, triton_cdiv(inter, n))](
            self.x, *_operands(gate_up), self.rows, self.block_expert, self.h, self.pairs, self.top_k, block0, expert0,
            expert_end, hidden, inter, FORMAT=fmt, GROUP=group, BLOCK_M=self.block_m, BLOCK_N=n, BLOCK_K=k,
            num_warps=warps, num_stages=stages)  # fmt: skip
        fmt, group = _format(down), _group(down, inter)
        n, k, warps, stages = self.tiles.get("down") or pick_tiles("down", fmt, group, inter, self.block_m)
        _down[(blocks, triton_cdiv(hidden, n))](
            self.h, *_operands(down), self.rows, self.block_expert, self.y, self.pairs, block0, expert0, expert_end,
            inter, hidden, FORMAT=fmt, GROUP=group, BLOCK_M=self.block_m, BLOCK_N=n, BLOCK_K=k, num_warps=warps,
            num_stages=stages)  # fmt: skip


def _dequantized_by_block(routed: _Routed, gate_up: QuantizedWeight, down: QuantizedWeight, scratch_bytes: int):
    """Blocks of experts in turn: dequantized into one bf16 scratch, then the bf16 GEMMs over their row blocks. The
    row blocks of each block of experts come to the host through a pinned copy while the GPU dequantizes the first
    block, so the one wait of the call leaves the GPU work queued behind it."""
    num_experts = gate_up.shape[0]
    per_block = experts_per_block(gate_up.shape, routed.x.element_size(), scratch_bytes)
    per_block = -(-num_experts // -(-num_experts // per_block))  # as many blocks, evened out
    edges = [*range(0, num_experts, per_block), num_experts]
    device = routed.x.device
    # the edges made on the device: a host list copied up would wait for the stream to drain
    expert_edges = torch.arange(0, num_experts + per_block, per_block, dtype=torch.int32, device=device)
    firsts = torch.searchsorted(routed.block_expert, expert_edges.clamp_(max=num_experts))
    block_edges = torch.empty(len(edges), dtype=firsts.dtype, pin_memory=True)  # blocks are sorted by expert:
    block_edges.copy_(firsts, non_blocking=True)  # block_edges[i] is the first block of expert edges[i]
    copied = torch.cuda.Event()
    copied.record()
    scratch = torch.empty(per_block * expert_float_bytes(gate_up.shape, 1), dtype=routed.x.dtype, device=device)
    first = _dequantize_block(gate_up, down, edges[0], edges[1], scratch)  # queued before the wait
    copied.synchronize()
    for i, ((e0, e1), (b0, b1)) in enumerate(zip(itertools.pairwise(edges), itertools.pairwise(block_edges.tolist()))):
        if b0 != b1:
            weights = first if i == 0 else _dequantize_block(gate_up, down, e0, e1, scratch)
            routed.gemms(*weights, b0, b1 - b0, e0, e1)


def _dequantize_block(gate_up: QuantizedWeight, down: QuantizedWeight, e0: int, e1: int, scratch: torch.Tensor):
    """Experts [e0, e1) of both projections into the scratch -> (gate_up [e, 2I, H], down [e, H, I]) bf16 views."""
    _, two_inter, hidden = gate_up.shape
    split = (e1 - e0) * two_inter * hidden
    gate_up_bf16 = dequantize_experts(gate_up, e0, e1, scratch[:split].view(e1 - e0, two_inter, hidden))
    down_bf16 = dequantize_experts(down, e0, e1, scratch[split : split * 3 // 2].view(e1 - e0, hidden, two_inter // 2))
    return gate_up_bf16, down_bf16


def compile_kernels(gate_up, down, top_k: int) -> None:
    """Compile the kernels for every row-block height, both ways for quantized weights, on stand-in weights of the
    real ones' format and shape (the expert count and token count are not specialized on), so that no prompt waits
    for Triton's compiler."""
    hidden = gate_up.shape[2]
    device = (gate_up.qweight if isinstance(gate_up, QuantizedWeight) else gate_up).device
    x = torch.zeros(4, hidden, dtype=torch.bfloat16, device=device)
    ids = torch.arange(4 * top_k, device=device).view(4, top_k) % gate_up.shape[0]
    weights = torch.ones(4, top_k, device=device)
    first = (False, True) if isinstance(gate_up, QuantizedWeight) else (False,)
    for block_m, dequantize_first in itertools.product((16, 32, 64, 128), first):
        fused_experts(x, gate_up, down, ids, weights, block_m=block_m, dequantize_first=dequantize_first)


def pick_tiles(kernel: str, fmt: str, group: int, k: int, block_m: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, pipeline stages) of a kernel over a K-wide weight: a q8 tile inside one scale group,
    a q4 tile one or two whole groups (K a multiple of it, so q4 tiles need no column mask)."""
    n, block_k, warps, stages = TILES[kernel]["bf16" if fmt == "bf16" else "quantized"][block_m >= 64]
    if fmt == "q8":
        while group % block_k:
            block_k //= 2
    elif fmt == "q4":
        block_k = 2 * group if block_k >= 2 * group and k % (2 * group) == 0 else group
    return n, block_k, warps, stages


def tiles_valid(fmt: str, group: int, k: int, block_k: int) -> bool:
    """Whether a BLOCK_K suits the kernels for this format (see pick_tiles)."""
    if fmt == "q8":
        return group % block_k == 0
    if fmt == "q4":
        return block_k in (group, 2 * group) and k % block_k == 0
    return True


SUM_BLOCK = 1024
# (BLOCK_N, BLOCK_K, warps, stages) by kernel, then bf16 or quantized weights, then row blocks of < 64 or >= 64
# rows: the fastest of bench/moe_kernels.py --sweep on an H100 (2026-11-27), V2-Lite shape, 2K and 8K tokens
TILES = {
    "gate_up": {"bf16": ((64, 64, 4, 4), (128, 64, 8, 3)), "quantized": ((64, 64, 4, 4), (64, 64, 4, 3))},
    "down": {"bf16": ((64, 64, 4, 4), (256, 64, 8, 3)), "quantized": ((64, 64, 4, 4), (128, 64, 8, 3))},
}


def _operands(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales) as the kernels take them; a bf16 weight passes itself as its (unread) scales."""
    if isinstance(weight, QuantizedWeight):
        return weight.qweight, weight.scales
    return weight.contiguous(), weight


def _format(weight) -> str:
    return weight.spec.format if isinstance(weight, QuantizedWeight) else "bf16"


def _group(weight, k: int) -> int:
    return weight.spec.group_for(k) if isinstance(weight, QuantizedWeight) else k


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: fused_available() says no
    triton = None

if triton is not None:

    @triton.jit
    def weight_tile(q_ptr, s_ptr, row0, n, n_mask, k0, K, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_K: tl.constexpr):  # fmt: skip
        """q8 or bf16: rows row0 + n of a [rows, K] weight, columns k0 .. k0 + BLOCK_K, transposed: [BLOCK_K, BLOCK_N]
        bf16, q * scale rounded once; a q8 tile lies inside one scale group (pick_tiles): one scale per row."""
        row = row0 + n[None, :].to(tl.int64)
        kk = k0 + tl.arange(0, BLOCK_K)
        mask = (kk < K)[:, None] & n_mask[None, :]
        if FORMAT == "bf16":
            w = tl.load(q_ptr + row * K + kk[:, None], mask=mask, other=0.0)
        else:
            scale = tl.load(s_ptr + row * (K // GROUP) + k0 // GROUP, mask=n_mask[None, :], other=0.0).to(tl.float32)
            w = (tl.load(q_ptr + row * K + kk[:, None], mask=mask, other=0).to(tl.float32) * scale).to(tl.bfloat16)
        return w

    @triton.jit
    def q4_tile(q_ptr, s_ptr, row0, n, n_mask, k0, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """q4: rows row0 + n of a [rows, K] weight, columns k0 .. k0 + BLOCK_K, transposed: [BLOCK_K, BLOCK_N] bf16.
        One load per byte; a nibble becomes the bf16 128 + v by setting exponent bits (0x4300 | v: no integer to float
        conversion), minus 136 gives q exactly, and q * scale is exact before its one rounding (bf16 arithmetic), as
        `dequantize` rounds it. BLOCK_K is one or two scale groups (pick_tiles); K is a multiple of it."""
        row = row0 + n[None, :].to(tl.int64)
        j = tl.arange(0, BLOCK_K // 2)
        byte = tl.load(q_ptr + row * (K // 2) + (k0 // 2 + j)[:, None], mask=n_mask[None, :], other=136)
        scales = s_ptr + row * (K // GROUP) + k0 // GROUP
        scale = tl.load(scales, mask=n_mask[None, :], other=0.0)
        if BLOCK_K > GROUP:
            scale = tl.where((j < GROUP // 2)[:, None], scale, tl.load(scales + 1, mask=n_mask[None, :], other=0.0))
        byte = byte.to(tl.uint16)
        low = ((byte & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
        high = ((byte >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        pair = tl.join((low - 136.0) * scale, (high - 136.0) * scale)  # [BLOCK_K / 2, BLOCK_N, 2]: columns 2j, 2j + 1
        return tl.reshape(tl.permute(pair, (0, 2, 1)), (BLOCK_K, pair.shape[1]))

    @triton.jit(do_not_specialize=["pairs", "top_k", "block0", "expert0", "expert_end"])
    def _gate_up(x_ptr, q_ptr, s_ptr, rows_ptr, block_expert_ptr, h_ptr, pairs, top_k, block0, expert0, expert_end,
                 K, N, FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
        # x [T, K]; weight [E, 2N, K] (gate rows, then up rows) from expert0 on; h [R, N] = silu(x Wg^T) * (x Wu^T)
        block = block0 + tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert >= expert_end:
            return
        m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(rows_ptr + m)
        token = (pair // top_k).to(tl.int64)
        valid = pair < pairs
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        gate_row0 = (expert - expert0).to(tl.int64) * 2 * N
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + token[:, None] * K + kk[None, :], mask=valid[:, None] & (kk < K)[None, :], other=0.0)
            if FORMAT == "q4":
                w_gate = q4_tile(q_ptr, s_ptr, gate_row0, n, n_mask, k0, K, GROUP, BLOCK_K)
                w_up = q4_tile(q_ptr, s_ptr, gate_row0 + N, n, n_mask, k0, K, GROUP, BLOCK_K)
            else:
                w_gate = weight_tile(q_ptr, s_ptr, gate_row0, n, n_mask, k0, K, FORMAT, GROUP, BLOCK_K)
                w_up = weight_tile(q_ptr, s_ptr, gate_row0 + N, n, n_mask, k0, K, FORMAT, GROUP, BLOCK_K)
            acc_gate = tl.dot(a, w_gate, acc_gate)
            acc_up = tl.dot(a, w_up, acc_up)
        gate = acc_gate.to(tl.bfloat16).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)
        h = (act * acc_up.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
        tl.store(h_ptr + m[:, None].to(tl.int64) * N + n[None, :], h, mask=n_mask[None, :])

    @triton.jit(do_not_specialize=["pairs", "block0", "expert0", "expert_end"])
    def _down(h_ptr, q_ptr, s_ptr, rows_ptr, block_expert_ptr, y_ptr, pairs, block0, expert0, expert_end, K, N,
              FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):  # fmt: skip
        # h [R, K] (padded rows); weight [E, N, K] from expert0 on; y [pairs, N] = h W^T, each row at its pair
        block = block0 + tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert >= expert_end:
            return
        m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(rows_ptr + m)
        valid = pair < pairs
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        row0 = (expert - expert0).to(tl.int64) * N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(h_ptr + m[:, None].to(tl.int64) * K + kk[None, :], mask=(kk < K)[None, :], other=0.0)
            if FORMAT == "q4":
                w = q4_tile(q_ptr, s_ptr, row0, n, n_mask, k0, K, GROUP, BLOCK_K)
            else:
                w = weight_tile(q_ptr, s_ptr, row0, n, n_mask, k0, K, FORMAT, GROUP, BLOCK_K)
            acc = tl.dot(a, w, acc)
        tl.store(y_ptr + pair[:, None].to(tl.int64) * N + n[None, :], acc.to(tl.bfloat16),
                 mask=valid[:, None] & n_mask[None, :])  # fmt: skip

    @triton.jit
    def _weighted_sum(y_ptr, w_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
        # out[t] = sum over s of float(y[t * TOP_K + s]) * w[t * TOP_K + s], rounded once
        t = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = n < N
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in tl.static_range(TOP_K):
            weight = tl.load(w_ptr + t * TOP_K + s)
            acc += tl.load(y_ptr + (t * TOP_K + s) * N + n, mask=mask, other=0.0).to(tl.float32) * weight
        tl.store(out_ptr + t * N + n, acc.to(out_ptr.dtype.element_ty), mask=mask)
