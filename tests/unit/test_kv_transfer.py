"""A sequence's KV and state rows cross hosts as SequenceKV chunks: through the wire, into another pool, exactly."""

import pytest
import torch

from krasis.common.kv_transfer import sequence_kv_chunks, write_sequence_kv
from krasis.common.protocol_pipeline import HandOff, SequenceKV
from krasis.common.sampling_params import SamplingParams
from krasis.common.shm import SharedKVPool
from krasis.common.wire import decode, encode

WIDTHS, STATES, PAGES, PAGE_SIZE, SLOTS = (8, 0, 6), (0, 5, 0), 12, 4, 3


def pool() -> SharedKVPool:
    return SharedKVPool.create("krasis-kvtest", WIDTHS, PAGES, PAGE_SIZE, "bfloat16", state_widths=STATES,
                               num_state_slots=SLOTS)  # fmt: skip


def hand_off(tokens: int, pages: list[int], slot: int) -> HandOff:
    return HandOff("r1", list(range(tokens)), tokens - 1, pages, SamplingParams(max_tokens=4), [], slot)


def test_chunks_through_the_wire_rebuild_the_rows_and_state_in_another_pool():
    with pool() as source, pool() as target:
        for layer in source.layers:
            layer.copy_(torch.randn(layer.shape))
        for region in source.states:
            region.copy_(torch.randn(region.shape))
        msg = hand_off(11, [7, 2, 9], slot=1)  # 10 cached rows over three scattered pages
        chunks = list(sequence_kv_chunks(source, msg, max_chunk_bytes=3 * 14 * 2))  # 3 rows of 14 bf16 a chunk
        assert [c.start for c in chunks] == [0, 3, 6, 9] and [bool(c.states) for c in chunks] == [0, 0, 0, 1]
        for chunk in chunks:
            write_sequence_kv(target, decode(encode(chunk)))
        slots = torch.tensor([p * PAGE_SIZE + i for p in (7, 2, 9) for i in range(PAGE_SIZE)][:10])
        for a, b in zip(source.layers, target.layers):
            assert torch.equal(a[slots], b[slots])
        assert torch.equal(target.states[1][1], source.states[1][1])
        assert not target.states[1][0].any()  # other slots untouched


@pytest.mark.parametrize("change, error", [
    (lambda m: {"page_table": [7]}, "need 3 pages"),
    (lambda m: {"page_table": [7, 2, 99]}, "outside"),
    (lambda m: {"kv_layers": m.kv_layers[:2]}, "KV of 2 layers"),
    (lambda m: {"kv_layers": [t.float() for t in m.kv_layers]}, "do not fit the pool"),
    (lambda m: {"state_slot": SLOTS}, "state slot"),
])  # fmt: skip
def test_a_chunk_that_does_not_fit_the_pool_is_refused_and_writes_nothing(change, error):
    with pool() as source, pool() as target:
        for layer in source.layers:
            layer.fill_(1.0)
        chunk = list(sequence_kv_chunks(source, hand_off(11, [7, 2, 9], slot=1)))[-1]
        bad = SequenceKV(**{**chunk.__dict__, **change(chunk)})
        with pytest.raises(ValueError, match=error):
            write_sequence_kv(target, bad)
        assert not any(layer.any() for layer in target.layers)
