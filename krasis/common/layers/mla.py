"""Multi-head latent attention (DeepSeek-V2): the cache holds the normed KV latent and the roped shared key.

Prefill chunks expand the cached latent through kv_b_proj into per-head keys and values, as the reference does (on a
GPU, a block of the context at a time).
Decode tokens attend in the latent space instead ("weight absorption"): W_UK (kv_b_proj's key rows) folds into the
query, W_UV (its value rows) applies after the attention-weighted sum of latents, so a token costs
context x heads x (2 kv_lora + rope) multiply-adds instead of context x kv_b_proj's size. Same math up to fp32 rounding.
"""

import torch
from torch import nn

from krasis.common.kernels.cpu import decode_ops
from krasis.common.kernels.gpu import rowwise
from krasis.common.kv_cache import ForwardBatch
from krasis.common.layers.attention import (
    FEW_QUERIES,
    attend_chunk_blockwise,
    attend_few_queries,
    attend_sequence,
    attend_single_queries,
    causal_mask,
    cudnn_takes,
    per_sequence,
)
from krasis.common.layers.norm import RMSNorm
from krasis.common.layers.rotary import RotaryEmbedding, apply_rotary_interleaved, rotate_interleaved_
from krasis.common.quant.formats import dequantize


class MLAttention(nn.Module):
    """DeepSeek-V2 MLA over paged KV of width kv_lora + rope; expands or absorbs per sequence, whichever is cheaper."""

    def __init__(self, layer_idx: int, cfg, rotary: RotaryEmbedding, softmax_scale: float):
        super().__init__()
        self.layer_idx, self.rotary, self.scale = layer_idx, rotary, softmax_scale
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        qk_head_dim = self.nope_dim + self.rope_dim
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # the reference uses the default eps here
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)
        # Kept from step to step, each with what it was made from: views cost torch ops (~5 us a layer each step)
        self._absorb: tuple[object, torch.Tensor, torch.Tensor] | None = None  # (kv_b_proj's weight, W_UK, W_UV)
        self._cache_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (CPU cache layer, keys, values)

    @property
    def kv_width(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._modules  # not self.q_proj, ...: each is a Module.__getattr__ call (~1 us)
        if self.q_lora_rank is None:
            return modules["q_proj"](x)
        return modules["q_b_proj"](modules["q_a_layernorm"](modules["q_a_proj"](x)))

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x: [T, H]
        tokens, heads, modules = x.shape[0], self.num_heads, self._modules  # _modules: as in _queries
        # Tensor methods, not indexing or Tensor.split: each of those costs a few microseconds more a call
        q = self._queries(x).view(tokens, heads, -1)
        q_nope, q_pe = q.split_with_sizes([self.nope_dim, self.rope_dim], -1)
        # the latent and the shared key as one head, [T, 1, kv_lora] and [T, 1, rope]: the norm and the rotation take
        # them as they are, and the queries' and the key's rope parts rotate in a call each (rotating them together
        # took a cat and two views, 5 more torch ops)
        kv_a = modules["kv_a_proj_with_mqa"](x).view(tokens, 1, -1)
        latent, k_pe = kv_a.split_with_sizes([self.kv_lora_rank, self.rope_dim], -1)
        tables = self.rotary.interleaved_tables(batch)
        if x.is_cuda:  # rotated in place: q then holds the whole roped queries, which prefill attends without a cat
            rotate_interleaved_(q_pe, tables)
            rotate_interleaved_(k_pe, tables)
        else:
            q, q_pe, k_pe = None, apply_rotary_interleaved(q_pe, tables), apply_rotary_interleaved(k_pe, tables)
        cached = torch.cat((modules["kv_a_layernorm"](latent), k_pe), dim=-1).view(tokens, -1)  # [T, kv_lora + rope]
        batch.kv.write(self.layer_idx, batch.write_slots, cached)
        return modules["o_proj"](self._attend(q_nope, q_pe, q, batch).reshape(tokens, -1))

    def _attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, q: torch.Tensor | None, batch: ForwardBatch):
        """Roped queries q_nope [T, heads, nope], q_pe [T, heads, rope] (and q, the two together, when they are its
        views) over each sequence's cache -> [T, heads, v]."""
        single_rows, singles = batch.single_queries
        if len(singles) == len(batch.seqs):  # a decode step: every sequence absorbs, all at once
            w_uk, w_uv = self._absorb_weights(q_nope.dtype)
            return self._unabsorb(self._attend_latent(self._absorbed_queries(q_nope, q_pe, w_uk), batch), w_uv)
        q = torch.cat((q_nope, q_pe), dim=-1) if q is None else q
        absorbs = [seq.query_len == 1 or self._absorbs(seq.query_len, seq.context_len) for seq in batch.seqs]
        out = q.new_zeros(q.shape[0], self.num_heads, self.v_dim)  # expanded sequences' outputs
        if any(absorbs):  # absorbed sequences' outputs, before W_UV
            out_latent = q.new_zeros(q.shape[0], self.num_heads, self.kv_lora_rank)
            w_uk, w_uv = self._absorb_weights(q.dtype)
            q_absorbed = self._absorbed_queries(q_nope, q_pe, w_uk)
        if singles:
            out_latent[single_rows] = self._attend_latent(q_absorbed[single_rows], batch)
        for (rows, seq), absorb in zip(per_sequence(batch), absorbs):
            if seq.query_len == 1:
                continue
            cached = batch.kv.read(self.layer_idx, seq.context_slots).to(q.dtype)  # [L, kv_lora + rope]
            if absorb:
                mask = causal_mask(seq.query_len, seq.context_len, None, q.device)
                out_latent[rows] = attend_few_queries(q_absorbed[rows], *self._latent_kv(cached), self.scale, mask)
            else:
                out[rows] = self._attend_expanded(q[rows], cached, seq)
        if any(absorbs):
            out += self._unabsorb(out_latent, w_uv)  # expanded sequences' rows add exact zeros
        return out

    def _attend_expanded(self, q: torch.Tensor, cached: torch.Tensor, seq) -> torch.Tensor:
        """A prefill chunk's queries [Tq, heads, nope + rope] over its context expanded through kv_b_proj: on a GPU
        with cuDNN a block of the context at a time (memory stays flat as the context grows), else all at once."""
        if seq.query_len > FEW_QUERIES and cudnn_takes(q, self.v_dim):
            expand = lambda start, stop: self._expand(cached[start:stop])  # noqa: E731
            return attend_chunk_blockwise(q, expand, seq.context_len - seq.query_len, self.scale)
        return attend_sequence(q, *self._expand(cached), self.scale, seq, None)

    def _absorbed_queries(self, q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """[T, heads, kv_lora + rope]: the queries as they meet the cached rows in the latent space."""
        return torch.cat((self._absorb_queries(q_nope, w_uk), q_pe), dim=-1)

    def _attend_latent(self, q_absorbed: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The step's one-query sequences (batch.single_queries), absorbed queries [B, heads, kv_lora + rope], in the
        latent space -> [B, heads, kv_lora] before W_UV."""
        cache = batch.kv.layers[self.layer_idx]
        # A CPU decode pool's layer lives as long as the pool: its views are made once. Never a GPU layer's, which
        # the views would keep alive (prefill stages a layer at a time).
        if cache.is_cpu and (self._cache_kv is None or self._cache_kv[0] is not cache):
            self._cache_kv = (cache, *self._latent_kv(cache))
        return attend_single_queries(q_absorbed, batch, self.layer_idx, self._latent_kv, self.scale, None)

    def _latent_kv(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows [..., kv_lora + rope] -> one shared KV head: keys the rows as they are, values their latent
        part, [..., 1, kv_lora + rope] and [..., 1, kv_lora] (views; the CPU pool layer's as made once)."""
        if self._cache_kv is not None and cached is self._cache_kv[0]:
            return self._cache_kv[1], self._cache_kv[2]
        keys = cached.unsqueeze(-2)
        return keys, keys.narrow(-1, 0, self.kv_lora_rank)

    def _expand(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached [L, kv_lora + rope] -> keys [L, heads, nope + rope], values [L, heads, v]."""
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent)
        if rowwise.expand_fits(kv, k_pe, self.nope_dim, self.v_dim):  # a GPU's prefill: one pass, no cat
            return rowwise.expand_latent(kv, k_pe, self.num_heads, self.nope_dim, self.v_dim)
        heads_kv = kv.view(-1, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = heads_kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)), dim=-1)
        return k, v

    def _absorbs(self, query_len: int, context_len: int) -> bool:
        """Whether attending in the latent space takes fewer multiply-adds than expanding the context through
        kv_b_proj: true for decode tokens, false for prefill chunks of more than ~100 queries."""
        heads, rank, kv_b_width = self.num_heads, self.kv_lora_rank, self.nope_dim + self.v_dim
        absorbed = query_len * heads * (kv_b_width * rank + context_len * (2 * rank + self.rope_dim))
        expanded = context_len * heads * (kv_b_width * rank + query_len * (kv_b_width + self.rope_dim))
        return absorbed < expanded

    def _absorb_queries(self, q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """q_nope [T, heads, nope] -> [T, heads, kv_lora]: q_nope . (W_UK latent) == (q_nope W_UK) . latent."""
        if q_nope.is_cpu and (absorbed := decode_ops.heads_matmul(q_nope, w_uk, False)) is not None:
            return absorbed  # one call over the weight (torch.bmm runs a matmul per head)
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def _unabsorb(self, out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """Attention-weighted latents [T, heads, kv_lora] -> values [T, heads, v] through W_UV."""
        if out_latent.is_cpu and (values := decode_ops.heads_matmul(out_latent, w_uv, True)) is not None:
            return values
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _absorb_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [heads, nope, kv_lora], W_UV [heads, v, kv_lora]): kv_b_proj's key and value rows, made once for the
        weight they come from. A quantized one is dequantized once and kept in `dtype` (V2-Lite: 16 x 256 x 512, 4 MB a
        layer in bf16), since absorption reads it whole every step."""
        proj = self._modules["kv_b_proj"]
        quantized = not isinstance(proj, nn.Linear)
        # new weight data (loading, .to()): new views
        source = proj if quantized else proj._parameters["weight"].data_ptr()
        if self._absorb is None or self._absorb[0] != source:
            weight = dequantize(proj.weight_q, dtype) if quantized else proj.weight
            heads = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            self._absorb = (source, *heads.split_with_sizes([self.nope_dim, self.v_dim], 1))
        return self._absorb[1], self._absorb[2]
