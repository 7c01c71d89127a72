"""The prefill model's KV and state on its own device while the pool is elsewhere (host shared memory): pages and
state rows lent to running prompts, and the hand-off of each step's results into the pool."""

import dataclasses

import torch

from krasis.common.kv_cache import KVCache, PageAllocator
from krasis.common.sequence_state import Plan, Sequence
from krasis.gpu_worker.kv_handoff import KVHandOff, layer_staging


class DeviceStaging:
    """Staging pages (and, for models with state, one staging state row) per running prompt.

    per_layer: the KV of one layer at a time on the device (two buffers taking turns, see `layer_staging`),
    so a step must hold whole prompts and every layer's KV leaves for the pool right after the layer; else all
    layers' KV stays on the device until each prompt's last chunk (chunked prefill across steps).
    """

    def __init__(self, pool: KVCache, state_widths: list[int], pages: int, state_slots: int, device, per_layer: bool):
        kv_widths, dtype = [layer.shape[1] for layer in pool.layers], pool.layers[0].dtype
        state_slots = state_slots if any(state_widths) else 0
        if per_layer:
            rows = pages * pool.page_size
            self.kv = layer_staging(kv_widths, rows, pool.page_size, dtype, device, state_widths, state_slots)
        else:
            self.kv = KVCache.allocate(kv_widths, pages, pool.page_size, dtype, device, state_widths, state_slots)
        self.pool, self.per_layer = pool, per_layer
        self.pages = PageAllocator(pages)
        self.state_rows = PageAllocator(state_slots) if state_slots else None
        self.lent: dict[str, tuple[list[int], int | None]] = {}  # request id -> (staging pages, staging state row)
        self.hand_off = KVHandOff(self.kv, pool, reuses_buffers=per_layer)

    def fits(self, num_tokens: int) -> bool:
        """Whether a prompt of this many tokens could ever be staged."""
        return self.kv.pages_for(num_tokens) <= self.pages.num_pages

    def admit(self, seq: Sequence) -> bool:
        """Lend the prompt its staging pages and state row; False (nothing lent) while they are taken."""
        pages = self.kv.pages_for(seq.num_prompt_tokens)
        if pages > self.pages.num_free or (self.state_rows is not None and not self.state_rows.num_free):
            return False
        row = self.state_rows.allocate(1)[0] if self.state_rows is not None else None
        self.lent[seq.request_id] = (self.pages.allocate(pages), row)
        return True

    def release(self, request_id: str) -> None:
        table, row = self.lent.pop(request_id, (None, None))
        if table is not None:
            self.pages.free(table)
        if row is not None:
            self.state_rows.free([row])

    def staged(self, plan: Plan) -> Plan:
        """The plan as the device sees it: each sequence on its staging pages and state row (copies: the
        sequences themselves keep their pool pages and slot)."""
        out = []
        for seq, take in plan:
            table, row = self.lent[seq.request_id]
            out.append((dataclasses.replace(seq, page_table=table, state_slot=row), take))
        return out

    def begin(self, plan: Plan, staging_slots: torch.Tensor) -> None:
        """Before the step's forward (num_cached not yet advanced): where its new KV and final states go."""
        pool_device = self.pool.layers[0].device
        pool_slots = torch.cat([self.pool.slots(s.page_table, s.num_cached, s.num_cached + n, pool_device)
                                for s, n in plan])  # fmt: skip
        finished = [seq for seq, take in plan if seq.num_cached + take == len(seq.token_ids)]
        states = [(self.lent[s.request_id][1], s.state_slot) for s in finished if self.lent[s.request_id][1] is not None]
        self.hand_off.begin(staging_slots, pool_slots, states)

    def close(self) -> None:
        self.hand_off.close()
