"""A decode follower's weights: its shard of each layer's routed experts, loaded without the rest of the model.

The model is built on the meta device for its shapes only; each layer's shard is read straight from the
quantized cache (a slice of the mapping, copied so it lands on the worker's NUMA node) or from the checkpoint
(only the shard's expert tensors are read). Peak memory is the shard itself, not the model plus the shard.
"""

from pathlib import Path

import torch
from torch import nn

from krasis.common.layers.moe import StackedExperts
from krasis.common.model_loader import empty_model
from krasis.common.quant.cache import ensure_cache, open_cache
from krasis.common.quant.plan import QuantPlan
from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader
from krasis.cpu_worker.expert_shard import ExpertShard, own_copy, shard_range, slice_experts

_PARTS = ("gate_up_proj", "down_proj")


def load_expert_shards(
    model_dir: str | Path, shard_index: int, num_shards: int, dtype: torch.dtype,
    quant: QuantPlan | None = None, cache_root: str | Path | None = None,
) -> list[ExpertShard]:  # fmt: skip
    """Shard `shard_index` of `num_shards` of every MoE layer, in layer order (the exchange's layer numbers)."""
    layers = [(n, m) for n, m in empty_model(model_dir).named_modules() if isinstance(m, StackedExperts)]
    ranges = {name: shard_range(m.num_experts, shard_index, num_shards) for name, m in layers}
    own = {name: _empty_like(m, *ranges[name]) for name, m in layers}
    if quant is not None and quant.experts:
        cache = open_cache(ensure_cache(model_dir, quant, cache_root=cache_root), model_dir=model_dir)
        for name, (start, stop) in ranges.items():
            for part in _PARTS:
                weight = slice_experts(cache.quantized(f"{name}.{part}"), start, stop)
                own[name].use_quantized(part, own_copy(weight))
    else:
        for experts in own.values():
            for part in _PARTS:
                shape = getattr(experts, part).shape
                setattr(experts, part, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
        _read_checkpoint(CheckpointReader(model_dir), own, ranges)
    return [ExpertShard(own[name], shard_index, num_shards, num_experts=m.num_experts) for name, m in layers]


def _empty_like(experts: StackedExperts, start: int, stop: int) -> StackedExperts:
    """A StackedExperts for experts [start, stop) of `experts`, on the meta device (no memory yet)."""
    hidden_size = experts.down_proj.shape[1]  # down_proj: [E, H, I]
    with torch.device("meta"):
        return StackedExperts(stop - start, hidden_size, experts.intermediate_size, experts.hidden_act)


def _read_checkpoint(reader: CheckpointReader, own: dict[str, StackedExperts], ranges: dict) -> None:
    """Only the checkpoint tensors of each shard's experts, ids renumbered from 0; CheckpointError if one lacks."""
    for name in reader.names:
        prefix, _, key = name.partition(".experts.")
        prefix += ".experts"
        if prefix not in own:
            continue
        start, stop = ranges[prefix]
        expert, dot, rest = key.partition(".")
        if key in _PARTS:  # stacked layout [E, ...]: one layer's tensor passes through, the shard stays
            own[prefix].load_checkpoint_tensor(key, reader.get(name)[start:stop])
        elif dot and expert.isdigit() and start <= int(expert) < stop:
            own[prefix].load_checkpoint_tensor(f"{int(expert) - start}.{rest}", reader.get(name))
    missing = [_global_key(prefix, key, ranges[prefix][0])
               for prefix, experts in own.items() for key in experts.missing_checkpoint_keys()]  # fmt: skip
    if missing:
        raise CheckpointError(f"{reader.model_dir}: checkpoint lacks {len(missing)} expert tensors: {missing[:5]}")


def _global_key(prefix: str, local_key: str, start: int) -> str:
    """`<prefix>.<local id>.<part>.weight` under the checkpoint's (global) expert id."""
    expert, _, rest = local_key.partition(".")
    return f"{prefix}.{int(expert) + start}.{rest}"
