"""Qwen3.5 MoE (Qwen3.5-35B-A3B): the text model of the multimodal checkpoint; Qwen3-Next's layers with the
DeltaNet projections split (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`), every layer MoE and the
top-k always renormalized. The config is the checkpoint's `text_config` (read_hf_config flattens it), the
weights live under `model.language_model.`; the vision tower is not loaded.

Rotary: the reference's multimodal RoPE (`mrope_section`) gives text tokens the same position on all three
axes, which is plain RoPE; the engine takes token ids only, so text positions are all there is.
"""

from dataclasses import dataclass

from torch import nn

from krasis.common.layers.gated_deltanet import SplitGatedDeltaNet
from krasis.common.layers.rotary import RotaryEmbedding
from krasis.common.models.qwen3_next import (
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    Qwen3NextSparseMoeBlock,
    hybrid_decoder_layer,
)


@dataclass(frozen=True)
class Qwen3_5MoeConfig(Qwen3NextConfig):
    @classmethod
    def from_hf(cls, raw: dict) -> "Qwen3_5MoeConfig":
        # No dense layers and no norm_topk_prob switch in this architecture: drop them if a config carries them.
        fixed = {**raw, "mlp_only_layers": [], "decoder_sparse_step": 1, "norm_topk_prob": True}
        return super().from_hf(fixed)


class Qwen3_5MoeForCausalLM(Qwen3NextForCausalLM):
    config_class = Qwen3_5MoeConfig
    checkpoint_prefixes = {
        "model.language_model.": "model.",
        "model.visual.": None,  # the vision tower: the engine takes token ids only
        "mtp.": None,
    }

    def build_layers(self, cfg: Qwen3_5MoeConfig) -> nn.ModuleList:
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        return nn.ModuleList(
            hybrid_decoder_layer(cfg, i, rotary, Qwen3NextSparseMoeBlock(cfg, True), SplitGatedDeltaNet)
            for i in range(cfg.num_hidden_layers)
        )
