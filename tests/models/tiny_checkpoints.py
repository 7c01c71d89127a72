"""Tiny random checkpoints built with transformers (the reference), one per config variant under test."""

import json
from pathlib import Path

import torch

from krasis.common.tokenizer.builder import write_tokenizer_files

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "beta_fast": 32,
    "beta_slow": 1,
}

QWEN3_MOE = {
    # plain MoE everywhere, top-k probabilities used as they are
    "qwen3_moe-base": dict(norm_topk_prob=False),
    # dense layer 0 and every other layer dense, renormalized top-k, q/k/v/o biases, tied embeddings
    "qwen3_moe-mixed": dict(
        norm_topk_prob=True,
        mlp_only_layers=[0],
        decoder_sparse_step=2,
        attention_bias=True,
        tie_word_embeddings=True,
        num_key_value_heads=1,
    ),
    # sliding-window attention shorter than the test prompts
    "qwen3_moe-sliding": dict(use_sliding_window=True, sliding_window=12, rope_theta=500.0),
}

DEEPSEEK_V2 = {
    # V2-Lite shape: no q_lora, YaRN, greedy routing, first layer dense
    "deepseek_v2-lite": dict(q_lora_rank=None, rope_scaling=YARN, topk_method="greedy", first_k_dense_replace=1),
    # V2 shape: q_lora, group-limited routing, routed scaling, v_head_dim != qk_nope_head_dim
    "deepseek_v2-full": dict(
        q_lora_rank=24,
        rope_scaling=YARN,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        v_head_dim=12,
        first_k_dense_replace=2,
        attention_bias=True,
    ),
    # default rope, every layer MoE, normalized top-k
    "deepseek_v2-normtopk": dict(q_lora_rank=None, norm_topk_prob=True, n_shared_experts=1, tie_word_embeddings=True),
}

QWEN3_NEXT = {
    # the published shape: every 4th layer full attention, rotary on a quarter of each head, renormalized top-k
    "qwen3_next-base": dict(),
    # explicit layer_types, a dense layer, half rotary, raw top-k, attention biases, tied embeddings, Hv = Hk
    "qwen3_next-mixed": dict(
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        mlp_only_layers=[1], partial_rotary_factor=0.5, norm_topk_prob=False, attention_bias=True,
        tie_word_embeddings=True, linear_num_value_heads=2, linear_conv_kernel_dim=3,
    ),
    # every other layer full attention, key heads wider than value heads, experts stored per expert (as published)
    "qwen3_next-perexpert": dict(full_attention_interval=2, linear_key_head_dim=16, per_expert=True),
}

QWEN3_5_MOE = {
    # the multimodal checkpoint as published: text_config, model.language_model.*, a (tiny) vision tower
    "qwen3_5_moe-base": dict(),
    # every other layer full attention, half rotary, three value heads per key head
    "qwen3_5_moe-interval2": dict(full_attention_interval=2, partial_rotary_factor=0.5, linear_num_value_heads=6),
}

VARIANTS = {**QWEN3_MOE, **DEEPSEEK_V2, **QWEN3_NEXT, **QWEN3_5_MOE}


def _qwen3_moe_config(vocab_size: int, overrides: dict):
    from transformers import Qwen3MoeConfig

    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    return Qwen3MoeConfig(**{**base, **overrides})


def _deepseek_v2_config(vocab_size: int, overrides: dict):
    from transformers import DeepseekV2Config

    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return DeepseekV2Config(**{**base, **overrides})


HYBRID_TEXT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
    num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    eos_token_id=None, bos_token_id=None, pad_token_id=None,
)


def _qwen3_next_config(vocab_size: int, overrides: dict):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{**HYBRID_TEXT, "vocab_size": vocab_size, **overrides})


def _qwen3_5_moe_config(vocab_size: int, overrides: dict):
    from transformers import Qwen3_5MoeConfig

    text = {**HYBRID_TEXT, "vocab_size": vocab_size, **overrides}
    del text["intermediate_size"]  # every layer is MoE
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision)


CONFIGS = {
    "qwen3_moe": _qwen3_moe_config,
    "deepseek_v2": lambda vocab_size, overrides: _deepseek_v2_config(vocab_size, overrides),
    "qwen3_next": _qwen3_next_config,
    "qwen3_5_moe": _qwen3_5_moe_config,
}


def _redraw(model, seed: int) -> None:
    """Weights large enough that greedy choices are well separated; norms and biases away from 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5))


def build_checkpoint(variant: str, out_dir: Path) -> Path:
    """Write a tiny checkpoint of `variant` with tokenizer files; returns the directory."""
    from transformers import AutoModelForCausalLM

    family = variant.split("-")[0]
    style = "deepseek" if family == "deepseek_v2" else "chatml"
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer_files(out_dir, style=style)
    overrides = dict(VARIANTS[variant])
    per_expert = overrides.pop("per_expert", False)
    config = CONFIGS[family](vocab_size, overrides)
    torch.manual_seed(0)
    cls = _model_class(config)
    model = (cls.from_config if hasattr(cls, "from_config") else cls._from_config)(config, dtype=torch.float32)
    _redraw(model, seed=sum(map(ord, variant)))
    model.save_pretrained(out_dir)
    if per_expert:
        _split_experts(out_dir / "model.safetensors")
    eos = json.loads((out_dir / "tokenizer_config.json").read_text()).get("eos_token")
    eos_id = _token_id(out_dir, eos)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    return out_dir


def _model_class(config):
    """The class that writes (and reads) the checkpoint as published: the multimodal wrapper for Qwen3.5."""
    from transformers import AutoModelForCausalLM, Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration if config.model_type == "qwen3_5_moe" else AutoModelForCausalLM


def _split_experts(path: Path) -> None:
    """Rewrite stacked `experts.gate_up_proj` / `experts.down_proj` as per-expert `experts.N.*_proj.weight`."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for name, tensor in load_file(path).items():
        prefix, _, last = name.rpartition(".")
        if prefix.endswith("mlp.experts") and last == "gate_up_proj":
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in tensor):
                tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif prefix.endswith("mlp.experts") and last == "down_proj":
            tensors.update({f"{prefix}.{e}.down_proj.weight": t for e, t in enumerate(tensor)})
        else:
            tensors[name] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _token_id(model_dir: Path, token) -> int:
    from tokenizers import Tokenizer

    text = token["content"] if isinstance(token, dict) else token
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id(text)


def load_reference(model_dir: Path):
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cls = _model_class(type("Config", (), {"model_type": config["model_type"]}))
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
