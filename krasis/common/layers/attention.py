"""Attention over paged KV, one sequence at a time: SDPA for prefill chunks, plain GEMMs for decode."""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from krasis.common.kv_cache import ForwardBatch, SequenceSlice

FEW_QUERIES = 16  # up to this many queries (decode, short chunks) attend by GEMMs; more through SDPA's fused kernels


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
    # 4-d [1, heads, tokens, dim]: SDPA's fused (flash / memory-efficient) kernels take no other shape
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


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
