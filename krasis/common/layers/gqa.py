"""Grouped-query attention over paged KV, with optional per-head q/k RMSNorm (Qwen3) and a sigmoid output
gate read from the second half of each query head's projection (Qwen3-Next / Qwen3.5)."""

import torch
from torch import nn

from krasis.common.kv_cache import ForwardBatch
from krasis.common.layers.attention import attend_sequence, attend_single_queries, per_sequence
from krasis.common.layers.norm import RMSNorm
from krasis.common.layers.rotary import RotaryEmbedding, apply_rotary_half


class GQAttention(nn.Module):
    """Keys and values of `num_kv_heads` heads shared by `num_heads` query heads; KV width 2 * kv heads * head_dim."""

    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        bias: bool = False,
        qk_norm_eps: float | None = None,
        sliding_window: int | None = None,
        output_gate: bool = False,
        norm_class: type[nn.Module] = RMSNorm,
    ):
        super().__init__()
        self.layer_idx, self.rotary, self.sliding_window = layer_idx, rotary, sliding_window
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.output_gate = output_gate
        q_width = num_heads * head_dim * (2 if output_gate else 1)
        self.q_proj = nn.Linear(hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        if qk_norm_eps is not None:
            self.q_norm = norm_class(head_dim, qk_norm_eps)
            self.k_norm = norm_class(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    @property
    def kv_width(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x: [T, H]
        tokens = x.shape[0]
        q, gate = self._queries(x)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # queries and keys in one rotation: [T, heads + kv_heads, head_dim]
        qk = apply_rotary_half(torch.cat((q, k), dim=1), self.rotary.half_tables(batch, q.dtype))
        q, k = qk.split_with_sizes([self.num_heads, self.num_kv_heads], 1)
        batch.kv.write(self.layer_idx, batch.write_slots, torch.cat((k, v), dim=-1).view(tokens, -1))
        out = self._attend(q, batch).view(tokens, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def _attend(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Roped queries [T, heads, head_dim] over each sequence's cache -> [T, heads, head_dim]."""
        scale, window = self.head_dim**-0.5, self.sliding_window
        rows, singles = batch.single_queries
        if len(singles) == len(batch.seqs):  # a decode step: all sequences at once
            return attend_single_queries(q, batch, self.layer_idx, self._split_kv, scale, window)
        out = torch.empty_like(q)
        if singles:
            out[rows] = attend_single_queries(q[rows], batch, self.layer_idx, self._split_kv, scale, window)
        for rows, seq in per_sequence(batch):
            if seq.query_len > 1:
                k, v = self._split_kv(batch.kv.read(self.layer_idx, seq.context_slots).to(q.dtype))
                out[rows] = attend_sequence(q[rows], k, v, scale, seq, window)
        return out

    def _split_kv(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows [..., 2 * kv_heads * head_dim] -> keys, values [..., kv_heads, head_dim] (views)."""
        kv = cached.unflatten(-1, (self.num_kv_heads, 2 * self.head_dim))
        return kv.split_with_sizes([self.head_dim, self.head_dim], -1)

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> queries [T, heads, head_dim], output gate [T, heads * head_dim] or None."""
        if not self.output_gate:
            return self.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim), None
        q, gate = self.q_proj(x).view(x.shape[0], self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        return q, gate.reshape(x.shape[0], -1)


def qk_norm_attention(cfg, layer_idx: int, rotary: RotaryEmbedding, **options) -> GQAttention:
    """GQA with per-head q/k RMSNorm from a Qwen3-family config (heads, head_dim, attention_bias, rms_norm_eps);
    `options`: what differs between the models (sliding_window, output_gate, norm_class)."""
    return GQAttention(
        layer_idx, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rotary,
        bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps, **options,
    )  # fmt: skip
