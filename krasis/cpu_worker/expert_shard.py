"""One CPU decode worker's share of a layer's routed experts, and its partial MoE output.

Workers own contiguous, balanced ranges of experts ([start, stop)), not round-robin sets, because a range of a
stacked [E, ...] tensor is one contiguous byte range: one slice of the memory-mapped quantized cache (a worker
faults in only its own pages, and can bind them to its NUMA node), one copy, and global -> local ids by one
subtraction. Round-robin would spread routing that favours neighbouring experts (DeepSeek's group-limited
routing picks whole groups of adjacent experts) more evenly; with n_group == 1 (V2-Lite, Qwen) it buys nothing.
"""

import torch
import torch.nn.functional as F

from krasis.common.layers.moe import StackedExperts
from krasis.common.quant.cpu_kernels import quant_experts
from krasis.common.quant.formats import QuantizedWeight


def shard_range(num_experts: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of the experts shard `shard_index` of `num_shards` owns; sizes differ by at most one."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is not in [0, {num_shards})")
    if num_shards > num_experts:
        raise ValueError(f"{num_shards} shards for {num_experts} experts: a shard would hold none")
    base, extra = divmod(num_experts, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (shard_index < extra)


def slice_experts(weight, start: int, stop: int):
    """Experts [start, stop) of a stacked float tensor or QuantizedWeight (a view, no copy)."""
    if isinstance(weight, QuantizedWeight):
        shape = (stop - start, *weight.shape[1:])
        return QuantizedWeight(weight.spec, shape, weight.qweight[start:stop], weight.scales[start:stop])
    return weight.detach()[start:stop]


def own_copy(weight):
    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(weight.spec, weight.shape, weight.qweight.clone(), weight.scales.clone())
    return weight.clone()


def _storage_nbytes(weight) -> int:
    tensors = (weight.qweight, weight.scales) if isinstance(weight, QuantizedWeight) else (weight,)
    return sum(t.untyped_storage().nbytes() for t in tensors)


class ExpertShard:
    """Experts [start, stop) of one layer; `partial` computes their share of the layer's routed-expert output."""

    def __init__(self, experts: StackedExperts, shard_index: int, num_shards: int, num_experts: int | None = None):
        """`experts`: all of the layer's experts, or only this shard's when `num_experts` gives the layer's count."""
        self.num_experts = experts.num_experts if num_experts is None else num_experts
        self.shard_index, self.num_shards = shard_index, num_shards
        self.start, self.stop = shard_range(self.num_experts, shard_index, num_shards)
        if num_experts is not None and experts.num_experts != self.stop - self.start:
            raise ValueError(f"shard {shard_index} of {num_shards} holds {self.stop - self.start} experts, "
                             f"the module {experts.num_experts}")  # fmt: skip
        self.hidden_act, self.act_fn = experts.hidden_act, experts.act_fn
        weights = experts.quantized or {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}
        first = self.start if num_experts is None else 0
        last = first + self.stop - self.start
        self.gate_up = slice_experts(weights["gate_up_proj"], first, last)  # [E_shard, 2I, H]
        self.down = slice_experts(weights["down_proj"], first, last)  # [E_shard, H, I]

    @property
    def quantized(self) -> bool:
        return isinstance(self.gate_up, QuantizedWeight)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the storage this shard keeps alive: the whole stack while it holds views, its slice after."""
        return _storage_nbytes(self.gate_up) + _storage_nbytes(self.down)

    def slice_weights(self) -> "ExpertShard":
        """Hold copies of only this shard's experts, so dropping the full StackedExperts frees the rest."""
        self.gate_up, self.down = own_copy(self.gate_up), own_copy(self.down)
        return self

    def owns(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Bool [T, K]: which (token, slot) pairs route to an expert of this shard."""
        return (topk_ids >= self.start) & (topk_ids < self.stop)

    def partial(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], topk_*: [T, K] (global ids) -> fp32 [T, H]: the sum over this shard's pairs only."""
        if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and weights must both be [T={x.shape[0]}, K]")
        token_idx, slot = torch.where(self.owns(topk_ids))  # [P] each: this shard's (token, slot) pairs
        local_ids = topk_ids[token_idx, slot] - self.start
        pair_weights = topk_weights[token_idx, slot]
        out = torch.zeros(x.shape, dtype=torch.float32)
        if token_idx.numel() == 0:
            return out
        if self.quantized:
            # One pair per row, so the kernel sees only our experts; x in fp32 so the rows come back unrounded.
            rows = quant_experts(
                x[token_idx].float(), self.gate_up, self.down, local_ids[:, None], pair_weights[:, None],
                self.hidden_act,
            )  # fmt: skip
            return out.index_add_(0, token_idx, rows)
        return self._float_partial(out, x, token_idx, local_ids, pair_weights)

    def _float_partial(self, out, x, token_idx, local_ids, pair_weights) -> torch.Tensor:
        # As StackedExperts.forward: per hit expert, its tokens in x.dtype, each product scaled then added in fp32.
        for expert in torch.unique(local_ids).tolist():
            pairs = local_ids == expert
            tokens = token_idx[pairs]
            gate, up = F.linear(x[tokens], self.gate_up[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down[expert]) * pair_weights[pairs, None]
            out.index_add_(0, tokens, y.float())
        return out


def build_shards(experts: StackedExperts, num_shards: int, sliced: bool = False) -> list[ExpertShard]:
    """Every shard of one layer (in-process use and tests); `sliced` gives each its own copy of its experts."""
    shards = [ExpertShard(experts, i, num_shards) for i in range(num_shards)]
    return [s.slice_weights() for s in shards] if sliced else shards

