"""Routed experts stored stacked ([E, 2I, H] gate+up, [E, H, I] down) and the top-k routers."""

import re

import torch
import torch.nn.functional as F
from torch import nn

from krasis.common.layers.mlp import activation
from krasis.common.quant.cpu_kernels import quant_experts
from krasis.common.quant.formats import QuantizedWeight

_PER_EXPERT_KEY = re.compile(r"(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class StackedExperts(nn.Module):
    """All routed experts of one layer. Loads both checkpoint layouts: per expert and stacked."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.hidden_act, self.act_fn = hidden_act, activation(hidden_act)
        self._loaded: set[tuple[int, str]] = set()
        self.quantized: dict[str, QuantizedWeight] = {}

    def load_checkpoint_tensor(self, key: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor (key relative to this module) in place; False if the key isn't ours."""
        if key in ("gate_up_proj", "down_proj"):
            _copy_checked(getattr(self, key).data, tensor, key)
            parts = ("gate_proj", "up_proj") if key == "gate_up_proj" else ("down_proj",)
            self._loaded.update((e, p) for e in range(self.num_experts) for p in parts)
            return True
        match = _PER_EXPERT_KEY.fullmatch(key)
        if match is None or int(match.group(1)) >= self.num_experts:
            return False
        expert, part = int(match.group(1)), match.group(2)
        inter = self.intermediate_size
        target = {
            "gate_proj": lambda: self.gate_up_proj.data[expert, :inter],
            "up_proj": lambda: self.gate_up_proj.data[expert, inter:],
            "down_proj": lambda: self.down_proj.data[expert],
        }[part]()
        _copy_checked(target, tensor, key)
        self._loaded.add((expert, part))
        return True

    def use_quantized(self, name: str, weight: QuantizedWeight) -> None:
        """Serve `gate_up_proj` or `down_proj` from a quantized weight (its float parameter goes away)."""
        if name not in ("gate_up_proj", "down_proj") or tuple(getattr(self, name).shape) != weight.shape:
            raise ValueError(f"experts.{name}: quantized shape {weight.shape} does not fit this layer")
        del self._parameters[name]
        self.quantized[name] = weight

    def missing_checkpoint_keys(self) -> list[str]:
        parts = ("gate_proj", "up_proj", "down_proj")
        return [f"{e}.{p}.weight" for e in range(self.num_experts) for p in parts if (e, p) not in self._loaded]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_ids, topk_weights: [T, K]. Sums the K products in fp32 and rounds once, as the reference.
        if self.quantized:
            gate_up, down = self.quantized["gate_up_proj"], self.quantized["down_proj"]
            return quant_experts(x, gate_up, down, topk_ids, topk_weights, self.hidden_act)
        out = torch.zeros_like(x, dtype=torch.float32)
        hit = torch.unique(topk_ids).tolist()
        for expert in hit:
            token_idx, slot = torch.where(topk_ids == expert)
            gate, up = F.linear(x[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            y = y * topk_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.float())
        return out.to(x.dtype)


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
    target.copy_(tensor)


def softmax_topk(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-style routing: softmax over all experts, keep top-k, optionally renormalize. -> weights, ids [T, K]."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_limited_topk(scores: torch.Tensor, top_k: int, n_group: int, topk_group: int):
    """DeepSeek-V2 `group_limited_greedy`: pick the best `topk_group` groups by max score, then top-k inside them."""
    tokens, num_experts = scores.shape
    group_scores = scores.view(tokens, n_group, num_experts // n_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(tokens, n_group, num_experts // n_group).reshape(tokens, -1)
    return torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1, sorted=False)
