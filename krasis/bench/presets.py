"""Benchmark presets: the published config.json fields of each model (random weights stand in for theirs).

A preset runs once its `model_type` is in the model registry; adding an architecture enables its preset.
"""

from krasis.bench import BenchError
from krasis.common.models import SUPPORTED_MODEL_TYPES

# deepseek-ai/DeepSeek-V2-Lite
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "scoring_func": "softmax", "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
        "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
    },
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
}

_QWEN3_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 4,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rope_scaling": None,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
    "sliding_window": None, "use_sliding_window": False,
}
# Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B
QWEN3_30B_A3B = {**_QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "moe_intermediate_size": 768}
QWEN3_235B_A22B = {**_QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 94,
                   "num_attention_heads": 64, "moe_intermediate_size": 1536}

# Qwen/Qwen3-Coder-Next (the Qwen3-Next-80B-A3B architecture): 3 Gated DeltaNet layers, then 1 gated attention
QWEN3_CODER_NEXT = {
    "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120,
    "num_hidden_layers": 48, "full_attention_interval": 4, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_scaling": None,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 512, "num_experts_per_tok": 10,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
}
# Qwen/Qwen3.5-35B-A3B, its text model (the Hub file nests these under text_config)
QWEN3_5_35B_A3B = {
    **QWEN3_CODER_NEXT, "model_type": "qwen3_5_moe", "vocab_size": 248320, "num_hidden_layers": 40,
    "num_experts": 256, "num_experts_per_tok": 8,
}

# A few MB, for CI: the V2-Lite layout (MLA with YaRN, a dense first layer, shared experts) at toy widths.
TINY = {
    **DEEPSEEK_V2_LITE, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32, "v_head_dim": 32, "moe_intermediate_size": 128, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 16384,
}

PRESETS = {
    "tiny": TINY,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "qwen3-235b-a22b": QWEN3_235B_A22B,
    "qwen3-coder-next": QWEN3_CODER_NEXT,
    "qwen3.5-35b-a3b": QWEN3_5_35B_A3B,
}


def preset_config(name: str, layers: int | None = None) -> dict:
    """The preset's config.json fields, cut to its first `layers` decoder layers; BenchError if it cannot run."""
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    raw = dict(PRESETS[name])
    if raw["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise BenchError(f"preset {name!r} needs model_type {raw['model_type']!r}, which this krasis does not "
                         f"support yet (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if layers is not None:
        if not 1 <= layers <= raw["num_hidden_layers"]:
            raise BenchError(f"--layers {layers}: preset {name!r} has 1 to {raw['num_hidden_layers']} layers")
        raw["num_hidden_layers"] = layers
    return raw
