"""Multi-head latent attention (DeepSeek-V2): the cache holds the normed KV latent and the roped shared key."""

import torch
from torch import nn

from krasis.common.kv_cache import ForwardBatch
from krasis.common.layers.attention import attend, per_sequence, sequence_mask
from krasis.common.layers.norm import RMSNorm
from krasis.common.layers.rotary import RotaryEmbedding, apply_rotary_interleaved


class MLAttention(nn.Module):
    def __init__(self, layer_idx: int, cfg, rotary: RotaryEmbedding, softmax_scale: float):
        super().__init__()
        self.layer_idx, self.rotary, self.scale = layer_idx, rotary, softmax_scale
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
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

    @property
    def kv_width(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # x: [T, H]
        tokens = x.shape[0]
        q = self._queries(x).view(tokens, self.num_heads, self.nope_dim + self.rope_dim)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = self.rotary.cos_sin(batch.positions)
        q_pe = apply_rotary_interleaved(q[..., self.nope_dim :], cos, sin)
        k_pe = apply_rotary_interleaved(k_pe[:, None, :], cos, sin)[:, 0]
        q = torch.cat((q[..., : self.nope_dim], q_pe), dim=-1)
        batch.kv.write(self.layer_idx, batch.write_slots, torch.cat((latent, k_pe), dim=-1))

        out = x.new_empty(tokens, self.num_heads, self.v_dim)
        for rows, seq in per_sequence(batch):
            cached = batch.kv.read(self.layer_idx, seq.context_slots).to(x.dtype)
            k, v = self._expand(cached)
            mask = sequence_mask(seq, None, x.device)
            out[rows] = attend(q[rows], k, v, self.scale, mask)
        return self.o_proj(out.view(tokens, -1))

    def _expand(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached [L, kv_lora + rope] -> keys [L, heads, nope + rope], values [L, heads, v]."""
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)), dim=-1)
        return k, v
