"""Decode workers' weights by shard: a follower loads only its shard of each layer's routed experts; the leader
loads the rest of the model plus shard 0, never the whole.

The model is built on the meta device for its shapes only; each layer's shard is read straight from the
quantized cache (a slice of the mapping, copied so it lands on the worker's NUMA node) or from the checkpoint
(only the shard's expert tensors are read). Peak memory is the shard itself, not the model plus the shard.
"""

from pathlib import Path

import torch
from torch import nn

from krasis.common.layers.moe import StackedExperts
from krasis.common.model_loader import empty_model, load_model, materialize
from krasis.common.quant.cache import ensure_cache, open_cache
from krasis.common.quant.plan import QuantPlan
from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader
from krasis.common.weights.load import load_weights
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


class RoutedExpertsSlot(nn.Module):
    """Where a layer's StackedExperts was, on a leader that loads only its shard; the process fills it in."""

    def forward(self, *args):
        raise RuntimeError("routed experts not attached: the decode leader swaps in its shard and the exchange")


def load_leader_model(model_dir, num_shards: int, dtype: torch.dtype, quant: QuantPlan | None = None,
                      cache_root=None) -> tuple[nn.Module, list[nn.Module], list[ExpertShard]]:  # fmt: skip
    """(model, MoE parents in layer order, shard 0 of each layer): every parent's `experts` is a
    RoutedExpertsSlot. From a quantized cache everything is mapped (the other shards' pages are never touched);
    from a checkpoint the other shards' expert tensors are never read."""
    if quant is not None and (quant.experts or quant.dense):
        model = load_model(model_dir, dtype=dtype, quant=quant, cache_root=cache_root)
        parents = moe_parents(model)
        shards = [ExpertShard(p.experts, 0, num_shards).slice_weights() for p in parents]
    else:
        model = empty_model(model_dir)
        parents = moe_parents(model)
        prefixes = tuple(f"{name}.experts." for name, m in model.named_modules() if m in parents)
        for parent in parents:
            parent.experts = RoutedExpertsSlot()  # its parameters are never allocated
        model = materialize(model, dtype, "cpu")
        optional = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
        load_weights(model, _WithoutRoutedExperts(CheckpointReader(model_dir), model, prefixes), optional=optional)
        model = model.eval().requires_grad_(False)
        shards = load_expert_shards(model_dir, 0, num_shards, dtype, quant, cache_root)
    for parent in parents:
        parent.experts = RoutedExpertsSlot()
    return model, parents, shards


def moe_parents(model) -> list[nn.Module]:
    """Modules holding a StackedExperts as `experts`, in layer order: index = the exchange's layer number."""
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), StackedExperts)]


class _WithoutRoutedExperts:
    """A CheckpointReader's stream less the routed experts' tensors (never read: load_expert_shards has them)."""

    def __init__(self, reader: CheckpointReader, model, prefixes: tuple[str, ...]):
        self.reader, self.model_dir, self.prefixes = reader, reader.model_dir, prefixes
        self.rename = getattr(model, "checkpoint_name", lambda name: name)

    def __iter__(self):
        for name in self.reader.names:
            renamed = self.rename(name)
            if renamed is None or not renamed.startswith(self.prefixes):
                yield name, self.reader.get(name)
