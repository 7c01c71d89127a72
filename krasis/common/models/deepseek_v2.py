"""DeepSeek-V2 and V2-Lite: MLA attention, shared + routed experts with greedy or group-limited routing."""

from dataclasses import dataclass

import torch
from torch import nn

from krasis.common.layers.mla import MLAttention
from krasis.common.layers.mlp import GatedMLP
from krasis.common.layers.moe import StackedExperts, group_limited_topk
from krasis.common.layers.rotary import RotaryEmbedding, yarn_mscale
from krasis.common.model_config import ConfigError, RopeConfig, require
from krasis.common.models.base import CausalLM, PreNormDecoderLayer

TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class DeepseekV2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int | None
    num_experts_per_tok: int
    rope: RopeConfig
    max_position_embeddings: int = 2048
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, raw: dict) -> "DeepseekV2Config":
        topk_method = raw.get("topk_method") or "greedy"
        if topk_method not in TOPK_METHODS:
            raise ConfigError(f"unsupported topk_method {topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
        if raw.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"unsupported scoring_func {raw['scoring_func']!r} for deepseek_v2; supported: softmax")
        return cls(
            vocab_size=require(raw, "vocab_size"),
            hidden_size=require(raw, "hidden_size"),
            intermediate_size=require(raw, "intermediate_size"),
            num_hidden_layers=require(raw, "num_hidden_layers"),
            num_attention_heads=require(raw, "num_attention_heads"),
            kv_lora_rank=require(raw, "kv_lora_rank"),
            q_lora_rank=raw.get("q_lora_rank"),
            qk_nope_head_dim=require(raw, "qk_nope_head_dim"),
            qk_rope_head_dim=require(raw, "qk_rope_head_dim"),
            v_head_dim=require(raw, "v_head_dim"),
            moe_intermediate_size=require(raw, "moe_intermediate_size"),
            n_routed_experts=require(raw, "n_routed_experts", "num_experts"),
            n_shared_experts=raw.get("n_shared_experts"),
            num_experts_per_tok=require(raw, "num_experts_per_tok"),
            rope=RopeConfig.from_hf(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            first_k_dense_replace=raw.get("first_k_dense_replace", 0),
            moe_layer_freq=raw.get("moe_layer_freq", 1),
            topk_method=topk_method,
            n_group=raw.get("n_group"),
            topk_group=raw.get("topk_group"),
            routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            hidden_act=raw.get("hidden_act", "silu"),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            scale *= yarn_mscale(self.rope.factor, self.rope.mscale_all_dim) ** 2
        return scale


class DeepseekV2MoE(nn.Module):
    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_routed_experts, bias=False)
        self.experts = StackedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared_experts = None
        if cfg.n_shared_experts:
            shared_size = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = GatedMLP(cfg.hidden_size, shared_size, cfg.hidden_act, cfg.mlp_bias)
        self._gate_t: tuple[int, torch.Tensor] | None = None  # (gate.weight's data_ptr, gate.weight.t())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router in fp32 (the reference keeps gate.weight fp32) -> weights, ids [T, K]."""
        cfg = self.cfg
        # x [T, H]: F.linear's own product, torch.mm by the transposed weight, without its 5 other ops every layer
        scores = torch.softmax(torch.mm(x.float(), self._gate_weight_t().float()), dim=-1)
        if cfg.topk_method == "greedy":
            weights, ids = torch.topk(scores, k=cfg.num_experts_per_tok, dim=-1, sorted=False)
        else:
            weights, ids = group_limited_topk(scores, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group)
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            # transformers 5 ignores this flag (every published V2 config has it off); we follow DeepSeek's code.
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:  # a multiply by 1 changes nothing and costs an op a layer
            weights = weights * cfg.routed_scaling_factor
        return weights, ids

    def _gate_weight_t(self) -> torch.Tensor:
        """gate.weight.t() [H, E], a view made once for the weight's data (new data after loading or .to(), a new
        view). Already fp32 (fp32_parameters), so route's .float() of it copies nothing."""
        weight = self._modules["gate"]._parameters["weight"]  # not self.gate.weight: two Module.__getattr__ calls
        if self._gate_t is None or self._gate_t[0] != weight.data_ptr():
            self._gate_t = (weight.data_ptr(), weight.t())
        return self._gate_t[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        weights, ids = self.route(x)
        modules = self._modules  # each read of a submodule by attribute is a Module.__getattr__ call
        out, shared = modules["experts"](x, ids, weights), modules.get("shared_experts")  # absent when None
        return out if shared is None else out + shared(x)


def deepseek_v2_decoder_layer(cfg: DeepseekV2Config, layer_idx: int, rotary: RotaryEmbedding) -> PreNormDecoderLayer:
    attn = MLAttention(layer_idx, cfg, rotary, cfg.softmax_scale)
    if cfg.is_sparse_layer(layer_idx):
        mlp = DeepseekV2MoE(cfg)
    else:
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
    return PreNormDecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2ForCausalLM(CausalLM):
    config_class = DeepseekV2Config

    def build_layers(self, cfg: DeepseekV2Config) -> nn.ModuleList:
        rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings)
        return nn.ModuleList(deepseek_v2_decoder_layer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))

    @property
    def fp32_parameters(self) -> tuple[str, ...]:
        """Kept in fp32 whatever the model dtype, as the reference keeps them."""
        return ("mlp.gate.weight",)
