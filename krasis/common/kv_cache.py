"""Paged KV storage and the per-step view of which tokens go where (`ForwardBatch`)."""

import functools
from dataclasses import dataclass, field

import numpy as np
import torch


class KVCacheFull(RuntimeError):
    """No free KV pages for a sequence that needs more."""


class PageAllocator:
    """Free KV page ids, handed out as one run of consecutive pages where one is free.

    A sequence on consecutive pages reads its context as a view of the cache (`KVCache.context`) and hands
    its KV off in one copy a layer; a fragmented pool still works, through gathers.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = np.arange(num_pages, dtype=np.int64)  # sorted ascending

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        free = self._free
        if count > len(free):
            raise KVCacheFull(f"need {count} KV pages, {len(free)} free of {self.num_pages}")
        if count == 0:
            return []
        runs = np.flatnonzero(free[count - 1 :] - free[: len(free) - count + 1] == count - 1)
        start = int(runs[0]) if len(runs) else 0  # the first run of `count`, else the lowest free pages
        taken = free[start : start + count] if len(runs) else free[:count]
        self._free = np.delete(free, np.arange(start, start + count))
        return taken.tolist()

    def free(self, pages: list[int]) -> None:
        self._free = np.sort(np.concatenate([self._free, np.asarray(pages, dtype=np.int64)]))


class KVCache:
    """One [num_pages * page_size, width] tensor per layer; a token's slot is page * page_size + offset.

    Each attention layer decides its width and what it stores (GQA: K and V heads; MLA: the latent and k_pe).
    The tensors may live anywhere (process memory, a shared-memory pool); pages are handed out by the
    scheduler's PageAllocator, never here, so every process viewing one pool agrees on who owns a page.

    Layers with per-sequence state instead of per-token KV (linear attention) keep it in `states[layer]`:
    one fp32 [num_state_slots, width] tensor per layer (width 0 for layers without state), a sequence
    owning one row (its state slot) in every layer. The layer decides what the row holds.
    """

    def __init__(self, layers: list[torch.Tensor], page_size: int, states: list[torch.Tensor] | None = None):
        self.layers, self.page_size = layers, page_size
        self.num_pages = layers[0].shape[0] // page_size if layers else 0
        self.states = states if states is not None else [torch.zeros(0, 0) for _ in layers]
        self.num_state_slots = max((s.shape[0] for s in self.states), default=0)

    @classmethod
    def allocate(
        cls, layer_widths: list[int], num_pages: int, page_size: int, dtype, device,
        state_widths: list[int] | None = None, num_state_slots: int = 0,
    ) -> "KVCache":  # fmt: skip
        """A pool in this process's memory; state rows only when some layer has state (they are fp32 always)."""
        layers = [torch.zeros(num_pages * page_size, w, dtype=dtype, device=device) for w in layer_widths]
        widths = state_widths if state_widths is not None else [0] * len(layer_widths)
        slots = num_state_slots if any(widths) else 0
        states = [torch.zeros(slots if w else 0, w, dtype=torch.float32, device=device) for w in widths]
        return cls(layers, page_size, states)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def slots(self, page_table: list[int], start: int, end: int, device=None) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence with this page table."""
        first_page = start // self.page_size
        positions = torch.arange(start - first_page * self.page_size, end - first_page * self.page_size, device=device)
        pages = torch.tensor(page_table[first_page : self.pages_for(end)], dtype=torch.long, device=device)
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    def context(self, page_table: list[int], end: int, device=None) -> "torch.Tensor | slice":
        """Slots of positions [0, end): a slice of rows when its pages are consecutive, so `read` is a view, not a copy."""
        used = self.pages_for(end)
        first = page_table[0] if used else 0
        if page_table[:used] == list(range(first, first + used)):
            return slice(first * self.page_size, first * self.page_size + end)
        return self.slots(page_table, 0, end, device)

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        cache = self.layers[layer]
        # a .to() of the dtype values already have is still a dispatched op (~2 us), once a layer in decode
        cache.index_copy_(0, slots, values if values.dtype == cache.dtype else values.to(cache.dtype))

    def read(self, layer: int, slots: "torch.Tensor | slice") -> torch.Tensor:
        """[len(slots), width]: a view for a slice of rows, a gathered copy for a slot tensor."""
        if isinstance(slots, slice):
            return self.layers[layer][slots]
        return self.layers[layer].index_select(0, slots)


@dataclass
class SequenceSlice:
    """One sequence's share of a forward step: its new tokens and everything it attends to."""

    query_start: int  # offset of its first new token in the flat token batch
    query_len: int
    context_slots: "torch.Tensor | slice"  # [context_len] KV slots of all its tokens, old and new (KVCache.context)
    state_slot: int | None = None  # its row in KVCache.states (models with per-sequence state only)

    @property
    def context_len(self) -> int:
        if isinstance(self.context_slots, slice):
            return self.context_slots.stop - self.context_slots.start
        return self.context_slots.numel()

    @property
    def num_cached(self) -> int:
        """Tokens processed before this step: 0 means the sequence starts here and its state is ignored."""
        return self.context_len - self.query_len


@dataclass
class ForwardBatch:
    """The flat token batch of one step: positions, where new KV goes, and per-sequence slices."""

    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T]
    seqs: list[SequenceSlice]
    kv: KVCache
    _per_step: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def per_step(self, key, build):
        """`build()`, run once for this step and shared by every layer (rotary tables, decode gather indices)."""
        if key not in self._per_step:
            self._per_step[key] = build()
        return self._per_step[key]

    @functools.cached_property
    def single_queries(self) -> tuple[list[int], list[SequenceSlice]]:
        """The sequences with one new token this step (decodes, and prompts of one token): (their rows of the flat
        batch, their slices), which attend by one batched computation."""
        singles = [seq for seq in self.seqs if seq.query_len == 1]
        return [seq.query_start for seq in singles], singles

    @property
    def last_token_indices(self) -> torch.Tensor:
        return torch.tensor([s.query_start + s.query_len - 1 for s in self.seqs], device=self.positions.device)

    @functools.cached_property
    def single_token_decodes(self) -> tuple[torch.Tensor, "torch.Tensor | slice"]:
        """The sequences adding one token to a cached context, for layers that step their state rows together:
        (their rows of the flat batch [B], their state slots [B], a slice when consecutive so that the state rows
        are a view of the pool). Built once a step, shared by every layer."""
        decoding = [seq for seq in self.seqs if seq.num_cached > 0 and seq.query_len == 1]
        if any(seq.state_slot is None or not 0 <= seq.state_slot < self.kv.num_state_slots for seq in decoding):
            raise ValueError(f"a decoding sequence has no valid state slot (0..{self.kv.num_state_slots - 1})")
        device = self.positions.device
        rows = torch.tensor([seq.query_start for seq in decoding], dtype=torch.long, device=device)
        slots = [seq.state_slot for seq in decoding]
        if slots and slots == list(range(slots[0], slots[0] + len(slots))):
            return rows, slice(slots[0], slots[0] + len(slots))
        return rows, torch.tensor(slots, dtype=torch.long, device=device)
