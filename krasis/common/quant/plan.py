"""Which checkpoint tensors the quantized cache stores in which format, and how per-expert
tensors are stacked so the runtime maps one tensor per layer and projection."""

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from krasis.common.quant.formats import QuantSpec
from krasis.common.weights.checkpoint import CheckpointError

EXPERT_MARKERS = (".mlp.experts.", ".mlp.shared_experts.", ".mlp.shared_expert.")
STACKED_PROJECTIONS = ("experts.gate_up_proj", "experts.down_proj")
# Linear layers that stay unquantized: routers decide which experts run, so their error is not
# averaged away like a projection's; they are tiny.
ROUTER_SUFFIXES = (".mlp.gate.weight", ".mlp.shared_expert_gate.weight")
KEEP_FRAGMENTS = ("embed_tokens.", "norm.")  # norm. also matches layernorm., q_norm., ...
UNQUANTIZED = ("bf16", "none")

_PER_EXPERT = re.compile(r"(?P<experts>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")
_LAYER = re.compile(r"(?P<stack>.*?layers)\.(?P<index>\d+)\.")


def role_of(name: str, shape: tuple[int, ...]) -> str:
    """"expert", "dense" or "keep" (stored as it is: embeddings, norms, biases, routers, convs)."""
    stacked = name.endswith(STACKED_PROJECTIONS) and len(shape) == 3
    linear = name.endswith(".weight") and len(shape) == 2
    if not (stacked or linear) or name.endswith(ROUTER_SUFFIXES):
        return "keep"
    if any(fragment in name for fragment in KEEP_FRAGMENTS):
        return "keep"
    if any(marker in name for marker in EXPERT_MARKERS):
        return "expert"
    return "dense"


def _parse_spec(text: str) -> QuantSpec | None:
    return None if text.strip().lower() in UNQUANTIZED else QuantSpec.parse(text)


def spec_text(spec: QuantSpec | None) -> str:
    """The canonical spelling that QuantSpec.parse reads back: "q4:g32", "q8:channel", "bf16"."""
    return "bf16" if spec is None else str(spec)


@dataclass(frozen=True)
class QuantPlan:
    """The format of routed + shared experts and of the other linear weights (None: unquantized)."""

    experts: QuantSpec | None
    dense: QuantSpec | None = None

    @classmethod
    def parse(cls, experts: str, dense: str = "bf16") -> "QuantPlan":
        return cls(_parse_spec(experts), _parse_spec(dense))

    @property
    def tag(self) -> str:
        """A file-name-safe summary, e.g. "q4g32-bf16"."""
        return "-".join(spec_text(s).replace(":", "") for s in (self.experts, self.dense))

    def to_json(self) -> dict:
        return {"experts": spec_text(self.experts), "dense": spec_text(self.dense)}

    @classmethod
    def from_json(cls, data: dict) -> "QuantPlan":
        return cls.parse(data["experts"], data["dense"])

    def spec_for(self, name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        role = role_of(name, shape)
        return self.experts if role == "expert" else self.dense if role == "dense" else None


def group_of(name: str) -> str:
    """The cache file a tensor goes to: one per decoder layer ("model.layers.003"), one for the rest."""
    match = _LAYER.match(name)
    return f"{match['stack']}.{int(match['index']):03d}" if match else "other"


@dataclass(frozen=True)
class CacheItem:
    """One tensor of the cache: its source tensors, rows concatenated (gate then up) per expert,
    then stacked over experts when `stacked`."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[tuple[str, ...], ...]
    stacked: bool = False


def plan_items(names: list[str], shape_of: Callable[[str], tuple[int, ...]]) -> list[CacheItem]:
    """The cache tensors made from one group's source tensors, in source order."""
    items, experts = [], {}
    for name in names:
        match = _PER_EXPERT.fullmatch(name)
        if match is None:
            items.append(CacheItem(name, tuple(shape_of(name)), ((name,),)))
        else:
            experts.setdefault(match["experts"], {})[(int(match["e"]), match["proj"])] = name
    for prefix, parts in experts.items():
        items += _stack_experts(prefix, parts, shape_of)
    twice = [name for name, count in Counter(item.name for item in items).items() if count > 1]
    if twice:
        raise CheckpointError(f"{twice[0]}: the checkpoint stores it both stacked and per expert")
    return items


def _stack_experts(prefix: str, parts: dict, shape_of) -> list[CacheItem]:
    # [E, 2I, H] gate+up and [E, H, I] down, as the model stores them (StackedExperts)
    count = 1 + max(e for e, _ in parts)
    for e in range(count):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if (e, proj) not in parts:
                raise CheckpointError(f"{prefix}.{e}.{proj}.weight is missing ({count} experts in the layer)")
    gate_up = tuple((parts[e, "gate_proj"], parts[e, "up_proj"]) for e in range(count))
    down = tuple((parts[e, "down_proj"],) for e in range(count))
    return [_stacked_item(f"{prefix}.gate_up_proj", gate_up, shape_of), _stacked_item(f"{prefix}.down_proj", down, shape_of)]


def _stacked_item(name: str, sources: tuple[tuple[str, ...], ...], shape_of) -> CacheItem:
    shapes = {tuple(tuple(shape_of(n)) for n in parts) for parts in sources}
    first = next(iter(shapes))
    if len(shapes) != 1 or len({s[1:] for s in first}) != 1 or len(first[0]) != 2:
        raise CheckpointError(f"{name}: per-expert tensors differ in shape or are not 2-D: {sorted(shapes)[:2]}")
    rows = sum(s[0] for s in first)
    return CacheItem(name, (len(sources), rows, first[0][1]), sources, stacked=True)
