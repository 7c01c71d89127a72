"""Attention over paged KV, one sequence at a time, through torch SDPA."""

import torch
import torch.nn.functional as F

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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """q: [Tq, Hq, D], k: [L, Hkv, D], v: [L, Hkv, Dv] -> [Tq, Hq, Dv]; GQA by repeating KV heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def per_sequence(batch: ForwardBatch):
    """Yield (slice of flat tokens, sequence) for each sequence of the step."""
    for seq in batch.seqs:
        yield slice(seq.query_start, seq.query_start + seq.query_len), seq


def sequence_mask(seq: SequenceSlice, sliding_window: int | None, device) -> torch.Tensor | None:
    return causal_mask(seq.query_len, seq.context_len, sliding_window, device)
