"""KV pages are handed out as consecutive runs where one is free, so contexts read as views of the cache."""

import pytest
import torch

from krasis.common.kv_cache import KVCache, KVCacheFull, PageAllocator


def test_pages_come_as_the_first_free_run_of_consecutive_ids():
    pages = PageAllocator(12)
    first, second, third = pages.allocate(3), pages.allocate(2), pages.allocate(4)
    assert (first, second, third) == ([0, 1, 2], [3, 4], [5, 6, 7, 8])
    pages.free(second)
    pages.free([0])
    assert pages.allocate(2) == [3, 4]  # the freed run, not the lone page 0 and whatever follows
    assert pages.allocate(3) == [9, 10, 11]


def test_a_fragmented_pool_still_serves_from_its_lowest_free_pages():
    pages = PageAllocator(8)
    taken = pages.allocate(8)
    pages.free(taken[::2])  # 0, 2, 4, 6: no two consecutive
    assert pages.allocate(3) == [0, 2, 4] and pages.num_free == 1
    with pytest.raises(KVCacheFull, match="need 2 KV pages, 1 free of 8"):
        pages.allocate(2)
    assert pages.allocate(0) == [] and pages.num_free == 1


def test_a_sequence_on_consecutive_pages_reads_its_context_as_a_view():
    kv = KVCache.allocate([4], num_pages=6, page_size=2, dtype=torch.float32, device="cpu")
    table = PageAllocator(6).allocate(3)
    slots = kv.slots(table, 0, 5)
    kv.write(0, slots, torch.arange(20, dtype=torch.float32).view(5, 4))
    context = kv.read(0, kv.context(table, 5))
    assert context.data_ptr() == kv.layers[0].data_ptr()  # a view: no gather
    assert torch.equal(context, kv.read(0, slots))
    scattered = [4, 1, 2]
    assert isinstance(kv.context(scattered, 5), torch.Tensor)  # not consecutive: slots to gather


def test_write_stores_values_in_the_cache_dtype():
    kv = KVCache.allocate([4], num_pages=2, page_size=2, dtype=torch.bfloat16, device="cpu")
    slots = kv.slots([1, 0], 0, 3)
    values = torch.randn(3, 4)
    kv.write(0, slots, values)
    assert torch.equal(kv.read(0, slots), values.to(torch.bfloat16))
    kv.write(0, slots[:1], values[:1].to(torch.bfloat16))  # already the cache dtype
    assert torch.equal(kv.read(0, slots[:1]), values[:1].to(torch.bfloat16))
