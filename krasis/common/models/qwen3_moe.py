"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with q/k norm, softmax top-k experts, optional dense layers."""

from dataclasses import dataclass

import torch
from torch import nn

from krasis.common.layers.gqa import qk_norm_attention
from krasis.common.layers.mlp import GatedMLP
from krasis.common.layers.moe import StackedExperts, softmax_topk
from krasis.common.layers.rotary import RotaryEmbedding
from krasis.common.model_config import RopeConfig, require
from krasis.common.models.base import CausalLM, PreNormDecoderLayer


@dataclass(frozen=True)
class Qwen3MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rope: RopeConfig
    max_position_embeddings: int = 32768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, raw: dict) -> "Qwen3MoeConfig":
        heads = require(raw, "num_attention_heads")
        return cls(
            vocab_size=require(raw, "vocab_size"),
            hidden_size=require(raw, "hidden_size"),
            intermediate_size=require(raw, "intermediate_size"),
            num_hidden_layers=require(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            moe_intermediate_size=require(raw, "moe_intermediate_size"),
            num_experts=require(raw, "num_experts", "num_local_experts"),
            num_experts_per_tok=require(raw, "num_experts_per_tok"),
            rope=RopeConfig.from_hf(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            hidden_act=raw.get("hidden_act", "silu"),
            attention_bias=bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window") else None,
        )

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        return self.experts(x, ids, weights.to(x.dtype))


def qwen3_moe_decoder_layer(cfg: Qwen3MoeConfig, layer_idx: int, rotary: RotaryEmbedding) -> PreNormDecoderLayer:
    attn = qk_norm_attention(cfg, layer_idx, rotary, sliding_window=cfg.sliding_window)
    if cfg.is_sparse_layer(layer_idx):
        mlp = Qwen3MoeSparseMoeBlock(cfg)
    else:
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
    return PreNormDecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeForCausalLM(CausalLM):
    config_class = Qwen3MoeConfig

    def build_layers(self, cfg: Qwen3MoeConfig) -> nn.ModuleList:
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        return nn.ModuleList(qwen3_moe_decoder_layer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
