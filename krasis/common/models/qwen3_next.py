"""Qwen3-Next (Qwen3-Coder-Next, Qwen3-Next-80B-A3B): Gated DeltaNet layers interleaved with gated full attention,
zero-centred RMSNorms, partial rotary, many small experts plus a sigmoid-gated shared expert."""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from krasis.common.layers.gated_deltanet import GatedDeltaNet
from krasis.common.layers.gqa import qk_norm_attention
from krasis.common.layers.mlp import GatedMLP
from krasis.common.layers.moe import StackedExperts, softmax_topk
from krasis.common.layers.norm import ZeroCenteredRMSNorm
from krasis.common.layers.rotary import RotaryEmbedding
from krasis.common.model_config import ConfigError, RopeConfig, require
from krasis.common.models.base import CausalLM, PreNormDecoderLayer

LAYER_TYPES = ("linear_attention", "full_attention")
DEFAULT_PARTIAL_ROTARY = 0.25  # what the reference assumes when the config does not say


@dataclass(frozen=True)
class Qwen3NextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    rope: RopeConfig
    intermediate_size: int | None = None  # of dense (mlp_only) layers
    max_position_embeddings: int = 32768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, raw: dict) -> "Qwen3NextConfig":
        heads, layers = require(raw, "num_attention_heads"), require(raw, "num_hidden_layers")
        return cls(
            vocab_size=require(raw, "vocab_size"),
            hidden_size=require(raw, "hidden_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            linear_num_key_heads=require(raw, "linear_num_key_heads"),
            linear_num_value_heads=require(raw, "linear_num_value_heads"),
            linear_key_head_dim=require(raw, "linear_key_head_dim"),
            linear_value_head_dim=require(raw, "linear_value_head_dim"),
            linear_conv_kernel_dim=raw.get("linear_conv_kernel_dim", 4),
            moe_intermediate_size=require(raw, "moe_intermediate_size"),
            shared_expert_intermediate_size=require(raw, "shared_expert_intermediate_size"),
            num_experts=require(raw, "num_experts"),
            num_experts_per_tok=require(raw, "num_experts_per_tok"),
            layer_types=layer_types(raw, layers),
            rope=partial_rope(raw),
            intermediate_size=raw.get("intermediate_size"),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            hidden_act=raw.get("hidden_act", "silu"),
            attention_bias=bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


def layer_types(raw: dict, num_layers: int) -> tuple[str, ...]:
    """`layer_types` as given, else every `full_attention_interval`-th layer full attention (default 4)."""
    types = raw.get("layer_types")
    if types is None:
        interval = raw.get("full_attention_interval") or 4
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"layer_types must name {num_layers} layers, each one of {', '.join(LAYER_TYPES)}: {types}")
    return tuple(types)


def partial_rope(raw: dict) -> RopeConfig:
    rope = RopeConfig.from_hf(raw)
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if raw.get("partial_rotary_factor") is None and params.get("partial_rotary_factor") is None:
        rope = replace(rope, partial_rotary_factor=DEFAULT_PARTIAL_ROTARY)
    return rope


class Qwen3NextSparseMoeBlock(nn.Module):
    """Routed experts (softmax top-k) plus one shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, cfg: Qwen3NextConfig, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        routed = self.experts(x, ids, weights.to(x.dtype))
        return routed + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def hybrid_mixer(cfg: Qwen3NextConfig, layer_idx: int, rotary: RotaryEmbedding, deltanet_class) -> nn.Module:
    """The layer's token mixer: Gated DeltaNet, or attention with q/k norm and a sigmoid output gate."""
    if cfg.layer_types[layer_idx] == "linear_attention":
        return deltanet_class(layer_idx, cfg)
    return qk_norm_attention(cfg, layer_idx, rotary, output_gate=True, norm_class=ZeroCenteredRMSNorm)


def hybrid_decoder_layer(
    cfg, layer_idx: int, rotary: RotaryEmbedding, mlp: nn.Module, deltanet_class
) -> PreNormDecoderLayer:
    mixer = hybrid_mixer(cfg, layer_idx, rotary, deltanet_class)
    mixer_name = "linear_attn" if cfg.layer_types[layer_idx] == "linear_attention" else "self_attn"
    return PreNormDecoderLayer(mixer, mlp, cfg.hidden_size, cfg.rms_norm_eps, ZeroCenteredRMSNorm, mixer_name)


class Qwen3NextForCausalLM(CausalLM):
    config_class = Qwen3NextConfig
    norm_class = ZeroCenteredRMSNorm
    checkpoint_prefixes = {"mtp.": None}  # the multi-token-prediction head, which decoding does not use

    def build_layers(self, cfg: Qwen3NextConfig) -> nn.ModuleList:
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        return nn.ModuleList(
            hybrid_decoder_layer(cfg, i, rotary, self._mlp(cfg, i), GatedDeltaNet)
            for i in range(cfg.num_hidden_layers)
        )

    @staticmethod
    def _mlp(cfg: Qwen3NextConfig, layer_idx: int) -> nn.Module:
        if cfg.is_sparse_layer(layer_idx):
            return Qwen3NextSparseMoeBlock(cfg, cfg.norm_topk_prob)
        if cfg.intermediate_size is None:
            raise ConfigError(f"layer {layer_idx} is dense but config.json has no intermediate_size")
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
