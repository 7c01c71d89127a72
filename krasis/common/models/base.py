"""The decoder-only skeleton every architecture shares: embeddings, layers, final norm, lm_head."""

import torch
from torch import nn

from krasis.common.kv_cache import ForwardBatch
from krasis.common.layers.norm import RMSNorm


class PreNormDecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); subclasses build the four modules with HF names."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Holds the `model.` part of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg, layers: nn.ModuleList):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = layers
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """An architecture subclasses this, sets `config_class` and builds its decoder layers."""

    config_class: type

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.build_layers(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def build_layers(self, cfg) -> nn.ModuleList:
        raise NotImplementedError

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def kv_widths(self) -> list[int]:
        """Per layer, how many values one token stores in the KV cache."""
        return [layer.self_attn.kv_width for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # input_ids: [T] (all sequences' new tokens, flat) -> final hidden states [T, H]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, batch)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, H] -> logits [N, V] in fp32
        return self.lm_head(hidden).float()
