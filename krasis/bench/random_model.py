"""Models with random weights and published shapes, built in memory (no checkpoint): for the streaming tests
and bench/gpu_prefill.py. Weights N(0, 1/fan_in), unit norms; routed experts optionally q4/q8."""

import math

import torch

from krasis.bench.presets import DEEPSEEK_V2_LITE
from krasis.common.layers.moe import StackedExperts
from krasis.common.models import model_class
from krasis.common.quant.formats import QuantSpec, quantize

TINY_DEEPSEEK_V2 = dict(  # the V2-Lite layout at toy widths, no YaRN
    DEEPSEEK_V2_LITE, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    max_position_embeddings=4096, rope_scaling=None,
)  # fmt: skip


@torch.no_grad()
def random_model(raw_config: dict, dtype=torch.bfloat16, experts_quant: str | None = None, seed: int = 0):
    """A CPU model of `raw_config` (HF config keys) with random weights; experts quantized if asked."""
    cls = model_class(raw_config["model_type"])
    with torch.device("meta"):
        model = cls(cls.config_class.from_hf(raw_config))
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data = torch.ones_like(param, dtype=dtype)
        else:
            fan_in = param.shape[-1]
            param.data = (torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith(getattr(model, "fp32_parameters", ())):
            param.data = param.data.float()
    model.tie_weights()
    if experts_quant is not None:
        spec = QuantSpec.parse(experts_quant)
        for module in model.modules():
            if isinstance(module, StackedExperts):
                for part in ("gate_up_proj", "down_proj"):
                    module.use_quantized(part, quantize(getattr(module, part).data, spec))
    return model.eval().requires_grad_(False)
