"""What a token costs: bytes a decode token reads, FLOPs a prompt's prefill computes (what the limits divide)."""

from dataclasses import dataclass

from torch import nn

from krasis.bench.models import weights_of
from krasis.common.layers.moe import StackedExperts


@dataclass(frozen=True)
class ExpertShape:
    """One layer's routed experts: `num_experts` of [hidden -> intermediate -> hidden], `top_k` per token."""

    num_experts: int
    top_k: int
    hidden: int
    intermediate: int

    def tokens_per_expert(self, tokens: int) -> int:
        """The mean per-expert GEMM batch of a prompt: its rows, spread over the experts."""
        return max(1, tokens * self.top_k // self.num_experts)


def expert_shape(model: nn.Module) -> ExpertShape:
    experts = next(m for m in model.modules() if isinstance(m, StackedExperts))
    gate_up = dict(weights_of(experts))["gate_up_proj"]  # [E, 2I, H]
    top_k = model.config.num_experts_per_tok
    return ExpertShape(experts.num_experts, top_k, gate_up.shape[-1], experts.intermediate_size)


def _part(name: str) -> str:
    if ".mlp.experts." in name:
        return "routed experts (top-k)"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.embed_tokens."):
        return "embedding (1 row)"
    if "_attn." in name:  # self_attn, linear_attn
        return "attention"
    return "MLP, shared experts, routers, norms"


def decode_bytes_per_token(model: nn.Module, context: int, kv_itemsize: int) -> dict[str, float]:
    """Bytes one token reads at batch 1, by part: each weight once (quantized weights at their stored size),
    the top-k of each layer's routed experts, one embedding row, and the KV of its whole context."""
    shape, parts = expert_shape(model), {}
    for name, weight in weights_of(model):
        size = float(weight.nbytes)
        part = _part(name)
        if part == "routed experts (top-k)":
            size *= shape.top_k / shape.num_experts
        elif part == "embedding (1 row)":
            size /= weight.shape[0]
        parts[part] = parts.get(part, 0.0) + size
    parts["KV cache"] = float(context * sum(model.kv_widths) * kv_itemsize)
    return parts


def prefill_flops(model: nn.Module, tokens: int) -> dict[str, float]:
    """FLOPs of prefilling one `tokens`-long prompt: "experts" (routed, top-k per token) and "other" (every other
    linear per token, lm_head for the last token only, causal attention scores and values)."""
    shape, weight_elements, expert_elements = expert_shape(model), 0, 0
    for name, weight in weights_of(model):
        if len(weight.shape) < 2 or _part(name) in ("embedding (1 row)", "lm_head"):
            continue
        if _part(name) == "routed experts (top-k)":
            expert_elements += weight.shape[-2] * weight.shape[-1]  # per expert
        else:
            weight_elements += weight.shape[-2] * weight.shape[-1] * (weight.shape[0] if len(weight.shape) > 2 else 1)
    cfg = model.config
    lm_head = cfg.hidden_size * cfg.vocab_size
    return {
        "experts": 2.0 * tokens * shape.top_k * expert_elements,
        "other": 2.0 * tokens * weight_elements + 2.0 * lm_head + attention_flops(model, tokens),
    }


def attention_flops(model: nn.Module, tokens: int) -> float:
    """Causal attention of one prompt: q.k and p.v over the tokens before each, every softmax-attention layer."""
    cfg = model.config
    qk_dim = getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0) or cfg.head_dim
    v_dim = getattr(cfg, "v_head_dim", None) or cfg.head_dim
    layers = sum(hasattr(layer, "self_attn") for layer in model.model.layers)
    return 2.0 * layers * cfg.num_attention_heads * (qk_dim + v_dim) * tokens * (tokens + 1) / 2
