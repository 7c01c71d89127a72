"""Attention over paged KV: prefill chunks through cuDNN block by block on a GPU (SDPA elsewhere), plain GEMMs for a
few queries, and the step's single queries (decode tokens) of all sequences together."""

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from krasis.common.kernels.cpu import decode_ops
from krasis.common.kernels.gpu.softmax_merge import merge_partials
from krasis.common.kv_cache import ForwardBatch, SequenceSlice

FEW_QUERIES = 16  # up to this many queries (decode, short chunks) attend by GEMMs; more through SDPA's fused kernels
# Single queries of several sequences attend as one padded batch while the longest context's KV is this small a
# layer (MLA: ~110 tokens in fp32, ~230 in bf16): a sequence attended on its own costs ~8 ops of host time, gathering
# copies its KV once more. Measured on 1 core (fp32, V2-Lite MLA): 4 x 64 tokens 0.59 ms gathered vs 0.70 one by one,
# 4 x 256 even (1.37 / 1.28), 4 x 1024 5.8 / 4.1.
BATCHED_DECODE_BYTES = 256 << 10

# Single queries attend in one decode_ops kernel call (KV read in place, fewer host ops), except over a single KV
# head (MLA's latent) past this context where the kernel lacks AMX tiles (or the KV is not bf16): there torch's GEMMs
# are faster. bench/decode_attention.py on 16 Xeon cores (2026-11-28), ms a layer for the kernel on tiles / the kernel
# without them / the GEMMs: V2-Lite MLA 0.07 / 0.09 / 0.14 at 0.5K, 0.27 / 0.42 / 0.51 at 4K, 1.14 / 2.24 / 2.00 at
# 32K; Qwen3-30B GQA (4 KV heads) 0.07 / 0.07 / 0.71, 0.25 / 0.29 / 1.15, 1.64 / 1.92 / 3.68.
DECODE_KERNEL_CONTEXT = 4096

# Cached rows [..., width] -> keys [..., kv_heads, D] and values [..., kv_heads, Dv] (views), per layer type.
KVSplit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (start, stop) -> keys [n, H, D] and values [n, H, Dv] of those context tokens (attend_chunk_blockwise)
ContextKV = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
# context tokens before a CUDA prefill chunk's own that it attends to at a time (their keys and values, MLA's
# expanded from the latent: 16 KB a token at V2-Lite's widths, 128 MB a block), so a chunk's memory does not grow
# with its context; and the multiple every call's query and key counts are padded to (attend_chunk_blockwise)
PAST_BLOCK = 8192
QUERY_BUCKET = 256


def causal_mask(query_len: int, context_len: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """Bool mask [query_len, context_len] (True = attend); None when plain causal needs none (one query)."""
    if query_len == 1 and (sliding_window is None or context_len <= sliding_window):
        return None
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask
) -> torch.Tensor:
    """q: [Tq, Hq, D], k: [L, Hkv, D], v: [L, Hkv, Dv] -> [Tq, Hq, Dv]; GQA by repeating KV heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if isinstance(mask, CausalBias) and cudnn_takes(q, v.shape[-1]):
        context = lambda start, stop: (k[start:stop], v[start:stop])  # noqa: E731
        return attend_chunk_blockwise(q, context, k.shape[0] - q.shape[0], scale)
    # 4-d [1, heads, tokens, dim]: SDPA's fused (flash / memory-efficient) kernels take no other shape
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def attend_chunk_blockwise(q: torch.Tensor, context: ContextKV, past: int, scale: float) -> torch.Tensor:
    """A prefill chunk's queries q [Tq, H, D], the last Tq tokens of a context of past + Tq, causal (lower right), in
    cuDNN's fused kernel: a square call (cuDNN's upper-left causal mask is the right one there) over the chunk's own
    keys, then the keys before it in blocks of PAST_BLOCK (no mask), the softmaxes merged exactly through each call's
    log-sum-exp in fp32 (merge_partials). `context(start, stop)` gives the keys and values of those tokens, [n, H, D]
    and [n, H, Dv] (MLA expands them from the latent there), so memory holds one block's keys and values whatever the
    context. SDPA itself sends a lower-right mask only to its memory-efficient kernel: 4.3x slower at MLA's widths on
    an H100/H200 (bench/attention_backends.py).

    cuDNN builds a plan for every new shape (42-56 ms, bench/cudnn_shapes.py), so the calls take few shapes: the
    square starts on a multiple of QUERY_BUCKET (its first rows are past keys, met by zero queries whose outputs are
    dropped) and ends padded with zero rows to a multiple of it (no real query sees a row after its own); the past
    before it is whole blocks and one QUERY_BUCKET multiple. warm_chunk_attention builds the usual ones at start.
    -> [Tq, H, Dv]."""
    tokens = q.shape[0]
    front = past % QUERY_BUCKET
    rows = -(-(front + tokens) // QUERY_BUCKET) * QUERY_BUCKET
    q4 = _as_heads_first(_padded(q, front, rows))

    def attend_to(start: int, stop: int, causal: bool):  # the block's keys and values live only inside the call
        k, v = (_as_heads_first(_padded(t, 0, rows if causal else stop - start)) for t in context(start, stop))
        return cudnn_attention(q4, k, v, scale, causal)

    out, lse = attend_to(past - front, past + tokens, causal=True)
    starts = range(0, past - front, PAST_BLOCK)
    if not starts:
        return out[0].transpose(0, 1)[front : front + tokens]
    for start, stop in itertools.pairwise([*starts, past - front]):
        block_out, block_lse = attend_to(start, stop, causal=False)
        out, lse = merge_partials(out, lse, block_out, block_lse, final=stop == past - front)
    return out[front : front + tokens]


def _padded(t: torch.Tensor, front: int, rows: int) -> torch.Tensor:
    """t [n, H, D] contiguous, at rows front .. front + n of [rows, H, D] zeros when it does not fill them itself."""
    if front == 0 and t.shape[0] == rows:
        return t.contiguous()  # one layout for every call (MLA's values are a strided view), one plan a shape
    out = t.new_zeros(rows, *t.shape[1:])
    out[front : front + t.shape[0]] = t
    return out


def _as_heads_first(t: torch.Tensor) -> torch.Tensor:
    """[n, H, D] -> [1, H, n, D] (a view), the layout of SDPA's fused kernels."""
    return t.transpose(0, 1).unsqueeze(0)


def warm_chunk_attention(heads: int, qk_width: int, v_width: int, max_chunk: int, dtype, device) -> None:
    """Build cuDNN's plans for the calls of attend_chunk_blockwise on chunks of up to `max_chunk` tokens that start
    on a QUERY_BUCKET boundary (a prompt from its first token): every square, and past blocks whole and of the
    remainder a chunk of `max_chunk` leaves. A shape first met while serving costs its prompt ~50 ms."""
    for rows in range(QUERY_BUCKET, -(-max_chunk // QUERY_BUCKET) * QUERY_BUCKET + 1, QUERY_BUCKET):
        q = torch.zeros(rows, heads, qk_width, dtype=dtype, device=device)

        def context(start: int, stop: int):
            return q.new_zeros(stop - start, heads, qk_width), q.new_zeros(stop - start, heads, v_width)

        attend_chunk_blockwise(q, context, PAST_BLOCK + max_chunk % PAST_BLOCK, 1.0)


def cudnn_attention(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [1, H, Tq, Dv], log-sum-exp [1, H, Tq, 1] in fp32) from cuDNN's fused attention."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]  # fmt: skip
    return out, lse.float().reshape(*out.shape[:3], 1)


_CUDNN_RUNS: dict[torch.device, bool] = {}


def cudnn_takes(q: torch.Tensor, v_width: int) -> bool:
    """Whether cuDNN's fused attention takes these queries and values v_width wide (see cudnn_shapes_ok)."""
    return cudnn_shapes_ok(q.dtype, q.shape[-1], v_width) and cudnn_attention_runs(q.device)


def cudnn_shapes_ok(dtype: torch.dtype, qk_width: int, v_width: int) -> bool:
    """bf16/fp16, head widths multiples of 8 up to 256: what cuDNN's fused attention takes; fp32 models and odd
    widths keep SDPA."""
    widths_ok = all(width % 8 == 0 and width <= 256 for width in (qk_width, v_width))
    return dtype in (torch.bfloat16, torch.float16) and widths_ok


def cudnn_attention_runs(device: torch.device) -> bool:
    """Whether cuDNN's fused attention runs on this device (checked once on a small problem; the CPU, or a GPU or
    build without it, keeps SDPA's own choice)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device not in _CUDNN_RUNS:
        try:
            q = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16, device=device)
            cudnn_attention(q, q, q, 1.0, causal=True)
            _CUDNN_RUNS[device] = True
        except (RuntimeError, NotImplementedError):
            _CUDNN_RUNS[device] = False
    return _CUDNN_RUNS[device]


def attend_few_queries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """`attend` for decode-sized query counts, by two GEMMs per KV head with its query heads folded into the GEMM
    rows: KV is read in place (never repeated per query head; the GEMMs take its row stride), and the GEMMs split the
    context across threads, where SDPA's CPU kernel splits only heads x query blocks (one thread for a decode token
    of one KV head). Softmax in fp32. q: [Tq, Hq, D], k: [L, Hkv, D], v: [L, Hkv, Dv], mask: bool [Tq, L] or None
    -> [Tq, Hq, Dv]."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if kv_heads == 1:  # MLA's latent: the loop below without its output copy
        scores = (q.reshape(tokens * heads, dim) @ k[:, 0].t()).float().mul_(scale)  # [Tq * heads, L]
        if mask is not None:
            scores.view(tokens, heads, -1).masked_fill_(~mask[:, None], float("-inf"))
        return (torch.softmax(scores, dim=-1).to(v.dtype) @ v[:, 0]).view(tokens, heads, -1)
    q = q.view(tokens, kv_heads, groups, dim)
    out = q.new_empty(tokens, kv_heads, groups, v.shape[-1])
    for head in range(kv_heads):
        scores = (q[:, head].reshape(tokens * groups, dim) @ k[:, head].t()).float().mul_(scale)  # [Tq * groups, L]
        if mask is not None:
            scores.view(tokens, groups, -1).masked_fill_(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out[:, head] = (probs @ v[:, head]).view(tokens, groups, -1)
    return out.view(tokens, heads, -1)


def attend_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seq: SequenceSlice, sliding_window: int | None
) -> torch.Tensor:
    """One sequence's queries q [Tq, Hq, D] over its context k [L, Hkv, D], v [L, Hkv, Dv], causal -> [Tq, Hq, Dv]."""
    if seq.query_len <= FEW_QUERIES:
        mask = causal_mask(seq.query_len, seq.context_len, sliding_window, q.device)
        return attend_few_queries(q, k, v, scale, mask)
    return attend(q, k, v, scale, sequence_mask(seq, sliding_window, q.device))


def per_sequence(batch: ForwardBatch):
    """Yield (slice of flat tokens, sequence) for each sequence of the step."""
    for seq in batch.seqs:
        yield slice(seq.query_start, seq.query_start + seq.query_len), seq


def sequence_mask(seq: SequenceSlice, sliding_window: int | None, device):
    """The mask `attend` takes for a sequence's queries over its context.

    On CUDA a plain causal mask is torch's lower-right causal bias, never materialized, so SDPA keeps its fused
    kernels: a prefill chunk of 4K queries over 8K context would otherwise build [heads, 4K, 8K] scores in
    memory the VRAM plan does not hold. On the CPU the same mask, materialized, keeps the reference's math path.
    """
    if torch.device(device).type == "cuda" and seq.query_len > 1 and sliding_window is None:
        return causal_lower_right(seq.query_len, seq.context_len)
    return causal_mask(seq.query_len, seq.context_len, sliding_window, device)


def attend_single_queries(
    q: torch.Tensor, batch: ForwardBatch, layer_idx: int, split_kv: KVSplit, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """The step's one-token sequences (`batch.single_queries`), all at once. q: [B, Hq, D] -> [B, Hq, Dv].

    Short contexts are gathered into one padded batch (one set of GEMMs for every sequence); long ones attend one
    sequence at a time, each reading its KV in place (a view of the cache where its pages are consecutive).
    """
    cache, seqs = batch.kv.layers[layer_idx], batch.single_queries[1]
    longest = batch.per_step("longest_single_query", lambda: max(seq.context_len for seq in seqs))
    if cache.is_cpu:
        k, v = split_kv(cache)
        if k.shape[1] > 1 or longest <= DECODE_KERNEL_CONTEXT or (
            k.dtype == torch.bfloat16 and decode_ops.attention_on_tiles()
        ):
            build = lambda: decode_rows(seqs, sliding_window)  # noqa: E731
            starts, ends, slots = batch.per_step(("decode_rows", sliding_window), build)
            out = decode_ops.decode_attention(q, k, v, starts, ends, scale, slots)
            if out is not None:
                return out
    if len(seqs) > 1 and longest * cache.shape[1] * cache.element_size() <= BATCHED_DECODE_BYTES:
        build = lambda: padded_context(seqs, sliding_window, cache.device)  # noqa: E731
        index, blocked = batch.per_step(("padded_context", sliding_window), build)
        k, v = split_kv(cache.index_select(0, index).view(len(seqs), longest, -1).to(q.dtype))
        return attend_one_query_each(q, k, v, scale, blocked)
    outs = []
    for row, seq in enumerate(seqs):
        k, v = split_kv(batch.kv.read(layer_idx, seq.context_slots).to(q.dtype)[None])
        blocked = window_blocked(seq.context_len, sliding_window, q.device)
        outs.append(attend_one_query_each(q[row : row + 1], k, v, scale, blocked))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def decode_rows(seqs: list[SequenceSlice], sliding_window: int | None):
    """Each one-query sequence's visible rows for `decode_ops.decode_attention`: (starts, ends, None) of cache rows when
    every context is a run of rows, else (starts, ends, slots) into all contexts' slots concatenated."""
    lengths = [seq.context_len for seq in seqs]
    visible = [n if sliding_window is None else min(n, sliding_window) for n in lengths]
    if all(isinstance(seq.context_slots, slice) for seq in seqs):
        ends = [seq.context_slots.stop for seq in seqs]
        return [end - n for end, n in zip(ends, visible)], ends, None
    slots = torch.cat([context_slot_tensor(seq.context_slots, "cpu") for seq in seqs])
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [end - n for end, n in zip(ends, visible)], ends, slots


def attend_one_query_each(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, blocked: torch.Tensor | None
) -> torch.Tensor:
    """One query per sequence, by two batched GEMMs with each KV head's query heads as the rows (KV never repeated
    per query head); scores and softmax in fp32, as `attend_few_queries`. q: [B, Hq, D], k: [B, L, Hkv, D],
    v: [B, L, Hkv, Dv], blocked: bool [B, 1, 1, L] (True = masked out) or None -> [B, Hq, Dv]."""
    seqs, heads, dim = q.shape
    kv_heads = k.shape[2]
    if seqs == 1:  # plain GEMMs over the context's view, one per KV head: faster than bmm on the CPU
        return attend_few_queries(q, k[0], v[0], scale, None if blocked is None else ~blocked[0, 0])
    q = q.view(seqs, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)).float().mul_(scale)  # [B, Hkv, groups, L]
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).view(seqs, heads, -1)


def padded_context(seqs: list[SequenceSlice], sliding_window: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """KV slots of each sequence's context padded to the longest by repeating its last slot, flat [B * L], and the
    mask of what is padding or outside the sliding window, bool [B, 1, 1, L]. Built once a step for all layers."""
    slots = [context_slot_tensor(seq.context_slots, device) for seq in seqs]
    longest = max(s.numel() for s in slots)
    index = torch.stack([torch.cat((s, s[-1:].expand(longest - s.numel()))) for s in slots])
    lengths = torch.tensor([s.numel() for s in slots], device=index.device)[:, None]
    positions = torch.arange(longest, device=index.device)[None, :]
    blocked = positions >= lengths
    if sliding_window is not None:
        blocked |= positions < lengths - sliding_window
    return index.flatten(), blocked[:, None, None, :]


def window_blocked(context_len: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """The positions a single query at the end of its context may not see, bool [1, 1, 1, L]; None: all visible."""
    if sliding_window is None or context_len <= sliding_window:
        return None
    return (torch.arange(context_len, device=device) < context_len - sliding_window)[None, None, None, :]


def context_slot_tensor(context_slots: "torch.Tensor | slice", device) -> torch.Tensor:
    if isinstance(context_slots, slice):
        return torch.arange(context_slots.start, context_slots.stop, device=device)
    return context_slots.to(device)
