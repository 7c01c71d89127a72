"""The decoder-only skeleton every architecture shares: embeddings, layers, final norm, lm_head."""

import torch
from torch import nn

from krasis.common.kv_cache import ForwardBatch
from krasis.common.layers.norm import RMSNorm


class PreNormDecoderLayer(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)), with HF names: the token mixer is `self_attn` unless
    `mixer_name` says otherwise (`linear_attn` for linear-attention layers)."""

    def __init__(
        self, mixer: nn.Module, mlp: nn.Module, hidden_size: int, eps: float,
        norm_class: type[nn.Module] = RMSNorm, mixer_name: str = "self_attn",
    ):  # fmt: skip
        super().__init__()
        self.mixer_name = mixer_name
        setattr(self, mixer_name, mixer)
        self.mlp = mlp
        self.input_layernorm = norm_class(hidden_size, eps)
        self.post_attention_layernorm = norm_class(hidden_size, eps)

    @property
    def token_mixer(self) -> nn.Module:
        return self._modules[self.mixer_name]

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, mlp_out = self.forward_unsummed(x, None, batch)
        return x + mlp_out

    def forward_unsummed(
        self, x: torch.Tensor, pending: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with its last residual add left to the next norm: takes x and `pending`, the previous layer's MLP
        output not yet added (None before the first layer); returns the residual stream after attention and this
        layer's MLP output. The add runs inside the norm's kernel call on the CPU in bf16 (one call a layer less),
        with the same roundings."""
        modules = self._modules  # not self.mlp, ...: each is a Module.__getattr__ call (~1 us), 4 a layer
        if pending is None:
            h = modules["input_layernorm"](x)
        else:
            x, h = modules["input_layernorm"].add_and_norm(x, pending)
        x, h = modules["post_attention_layernorm"].add_and_norm(x, modules[self.mixer_name](h, batch))
        return x, modules["mlp"](h)


class DecoderModel(nn.Module):
    """Holds the `model.` part of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg, layers: nn.ModuleList, norm_class: type[nn.Module] = RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = layers
        self.norm = norm_class(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """An architecture subclasses this, sets `config_class` and builds its decoder layers."""

    config_class: type
    norm_class: type[nn.Module] = RMSNorm  # of the final norm
    # checkpoint name prefix -> the model's (None: tensors the text model does not use, e.g. a vision tower)
    checkpoint_prefixes: dict[str, str | None] = {}

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.build_layers(cfg), self.norm_class)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def build_layers(self, cfg) -> nn.ModuleList:
        raise NotImplementedError

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def kv_widths(self) -> list[int]:
        """Per layer, how many values one token stores in the KV cache (0: none, e.g. linear attention)."""
        return [layer.token_mixer.kv_width for layer in self.model.layers]

    @property
    def state_widths(self) -> list[int]:
        """Per layer, how many fp32 values one sequence keeps as state (0: none, e.g. full attention)."""
        return [getattr(layer.token_mixer, "state_width", 0) for layer in self.model.layers]

    @classmethod
    def checkpoint_name(cls, name: str) -> str | None:
        """The model's name for a checkpoint tensor, or None for one to skip."""
        for prefix, ours in cls.checkpoint_prefixes.items():
            if name.startswith(prefix):
                return None if ours is None else ours + name[len(prefix) :]
        return name

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # input_ids: [T] (all sequences' new tokens, flat) -> final hidden states [T, H]
        x, pending = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, pending = layer.forward_unsummed(x, pending, batch)
        return self.model.norm.add_and_norm(x, pending)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, H] -> logits [N, V] in fp32
        return self.lm_head(hidden).float()
