"""A prefilled sequence's KV and state rows out of one host's shared pool and into another's, as SequenceKV chunks.

Shared memory does not cross hosts: for a decode pool on another host the gateway reads the rows the prefill
worker wrote (`sequence_kv_chunks`) and the remote host writes them into its own pool (`write_sequence_kv`) at
the same page table, before the HandOff. Both pools have the same geometry (the remote one is built from the
gateway's JoinReply), so pages and state slots mean the same rows on both sides.
"""

from collections.abc import Iterator

import torch

from krasis.common.protocol_pipeline import HandOff, SequenceKV

DEFAULT_CHUNK_BYTES = 8 << 20  # a few ms of a 10 Gb/s link; well under the wire's message limit


def _slots(page_table: list[int], page_size: int, start: int, stop: int) -> torch.Tensor:
    positions = torch.arange(start, stop)  # [rows]
    return torch.tensor(page_table, dtype=torch.long)[positions // page_size] * page_size + positions % page_size


def sequence_kv_chunks(pool, hand_off: HandOff, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[SequenceKV]:
    """The cached rows of `hand_off` (all tokens but the last) from `pool` (a SharedKVPool), chunk by chunk; the
    last chunk carries the state rows. Each chunk is a copy: the pages may be reused once the pool confirms."""
    rows = len(hand_off.token_ids) - 1
    row_bytes = sum(layer.shape[1] * layer.element_size() for layer in pool.layers)
    per_chunk = max(1, max_chunk_bytes // max(1, row_bytes))
    for start in range(0, max(rows, 1), per_chunk):
        stop = min(rows, start + per_chunk)
        slots = _slots(hand_off.page_table, pool.page_size, start, stop)
        kv_layers = [layer.index_select(0, slots) for layer in pool.layers]  # [rows, width] each
        last = stop == rows
        states = []
        if last and hand_off.state_slot is not None:
            states = [region[hand_off.state_slot].clone() for region in pool.states]  # [width] fp32 each
        yield SequenceKV(hand_off.request_id, list(hand_off.page_table), start, kv_layers,
                         hand_off.state_slot, states)  # fmt: skip


def write_sequence_kv(pool, msg: SequenceKV) -> None:
    """Write one chunk into `pool` (a SharedKVPool); ValueError, with nothing written, if it does not fit it."""
    layers, states = pool.layers, pool.states
    if len(msg.kv_layers) != len(layers):
        raise ValueError(f"{msg.request_id}: KV of {len(msg.kv_layers)} layers, the pool has {len(layers)}")
    rows = msg.kv_layers[0].shape[0] if msg.kv_layers else 0
    for values, layer in zip(msg.kv_layers, layers):
        if values.dtype != layer.dtype or tuple(values.shape) != (rows, layer.shape[1]):
            raise ValueError(f"{msg.request_id}: KV rows {values.dtype} {tuple(values.shape)} do not fit the pool "
                             f"({layer.dtype} [{rows}, {layer.shape[1]}])")  # fmt: skip
    pages_needed = -(-(msg.start + rows) // pool.page_size)
    if msg.start < 0 or len(msg.page_table) < pages_needed:
        raise ValueError(f"{msg.request_id}: rows [{msg.start}, {msg.start + rows}) need {pages_needed} pages, "
                         f"the page table has {len(msg.page_table)}")  # fmt: skip
    if any(not 0 <= p < pool.num_pages for p in msg.page_table):
        raise ValueError(f"{msg.request_id}: page table names pages outside [0, {pool.num_pages})")
    _check_states(pool, msg, states)
    slots = _slots(msg.page_table, pool.page_size, msg.start, msg.start + rows)
    for values, layer in zip(msg.kv_layers, layers):
        if layer.shape[1]:
            layer.index_copy_(0, slots, values)
    for values, region in zip(msg.states, states):
        region[msg.state_slot].copy_(values)


def _check_states(pool, msg: SequenceKV, states: list) -> None:
    if not msg.states:
        return
    if msg.state_slot is None or not 0 <= msg.state_slot < pool.descriptor.num_state_slots:
        raise ValueError(f"{msg.request_id}: state slot {msg.state_slot} is not in the pool's "
                         f"{pool.descriptor.num_state_slots} slots")  # fmt: skip
    shapes = [(v.dtype, tuple(v.shape)) for v in msg.states]
    if shapes != [(torch.float32, (region.shape[1],)) for region in states]:
        raise ValueError(f"{msg.request_id}: state rows {shapes} do not fit the pool's state widths")
