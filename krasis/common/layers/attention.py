"""Attention over paged KV, one sequence at a time, through torch SDPA."""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from krasis.common.kv_cache import ForwardBatch, SequenceSlice


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
