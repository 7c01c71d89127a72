"""CPU decode-step kernels (krasis/common/kernels/cpu): decode attention equals softmax attention over the same rows
(in place, through slots, windowed, split into many work items), the per-head products equal torch.bmm, and the
norm and rotary kernels round as the torch formulas they replace."""

import pytest
import torch

from krasis.common.kernels.cpu import decode_ops
from krasis.common.layers.attention import attend_few_queries
from krasis.common.layers.norm import RMSNorm
from krasis.common.layers.rotary import interleaved_tables

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# MLA's latent (one KV head, values the first 512 of the 576 key dims), GQA 8/2 with head dims that end in a partial
# SIMD step, and MHA with one query head per KV head
LAYOUTS = {"mla": (16, 1, 576, 512), "gqa": (8, 2, 36, 36), "mha": (3, 3, 40, 24)}


def cache_views(layout: str, rows: int, dtype, seed=0):
    """A cache layer [rows, width] and its (k [rows, Hkv, D], v [rows, Hkv, Dv]) views, as the layers split it."""
    _, kv_heads, dim, v_dim = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    if layout == "mla":
        cache = torch.randn(rows, dim, generator=g).to(dtype)
        return cache[:, None, :], cache[:, None, :v_dim]
    cache = torch.randn(rows, kv_heads, dim + v_dim, generator=g).to(dtype)
    return cache[..., :dim], cache[..., dim:]


def reference_attention(q, k, v, rows_per_seq, scale):
    """fp64 softmax attention; scores rounded to q's dtype first, as a matmul in that dtype rounds them."""
    out = []
    for b, rows in enumerate(rows_per_seq):
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        per_head = []
        for h in range(heads):
            scores = (q[b, h].double() @ k[rows, h // group].double().T).to(q.dtype).double()
            per_head.append(torch.softmax(scores * scale, -1) @ v[rows, h // group].double())
        out.append(torch.stack(per_head))
    return torch.stack(out)


def assert_attention_close(actual, expected, dtype):
    bound = 1e-6 if dtype == torch.float32 else 2**-8  # bf16: the output's own rounding
    assert actual.dtype == dtype
    assert ((actual.double() - expected).abs().max() / expected.abs().max()).item() <= bound


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_attention_equals_softmax_attention_in_place_and_through_slots(layout, dtype):
    heads, _, dim, _ = LAYOUTS[layout]
    k, v = cache_views(layout, 3000, dtype)
    q = torch.randn(3, heads, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    starts, ends = [0, 700, 1100], [1, 1900, 3000]  # one row; 1200 rows (several work items); a window's tail
    scale = dim**-0.5
    expected = reference_attention(q, k, v, [slice(s, e) for s, e in zip(starts, ends)], scale)
    assert_attention_close(decode_ops.decode_attention(q, k, v, starts, ends, scale), expected, dtype)
    slots = torch.randperm(3000, generator=torch.Generator().manual_seed(2))
    expected = reference_attention(q, k, v, [slots[s:e] for s, e in zip(starts, ends)], scale)
    assert_attention_close(decode_ops.decode_attention(q, k, v, starts, ends, scale, slots), expected, dtype)


def paged_slots(rows: int, seed: int) -> torch.Tensor:
    """Cache rows in pages of 16, the pages in a shuffled order (a long-lived pool's slots)."""
    pages = torch.randperm(rows // 16, generator=torch.Generator().manual_seed(seed))
    return (pages[:, None] * 16 + torch.arange(16)).flatten()


@pytest.mark.parametrize("paged", [False, True], ids=["rows", "slots"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_decode_attention_over_long_mla_contexts_reads_values_from_the_key_rows(dtype, paged):
    k, v = cache_views("mla", 9008, dtype)  # v: the first 512 columns of k's rows, one cache row each
    assert v.data_ptr() == k.data_ptr() and v.stride(0) == k.stride(0)
    q = torch.randn(2, 16, 576, generator=torch.Generator().manual_seed(1)).to(dtype)
    starts, ends = [0, 1001], [9008, 6000]  # many blocks and items; an odd-sized last block
    slots = paged_slots(9008, 2) if paged else None
    rows = [slice(s, e) if slots is None else slots[s:e] for s, e in zip(starts, ends)]
    expected = reference_attention(q, k, v, rows, 576**-0.5)
    assert_attention_close(decode_ops.decode_attention(q, k, v, starts, ends, 576**-0.5, slots), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_decode_attention_takes_many_query_heads_an_odd_key_width_and_a_value_tail(dtype):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(700, 2, 57, generator=g).to(dtype)  # 2 KV heads, keys 37 wide, values 20
    k, v = cache[..., :37], cache[..., 37:]
    q = torch.randn(2, 80, 37, generator=g).to(dtype)  # 40 query heads a KV head: several vectors of heads
    expected = reference_attention(q, k, v, [slice(3, 700), slice(0, 5)], 0.2)
    assert_attention_close(decode_ops.decode_attention(q, k, v, [3, 0], [700, 5], 0.2), expected, dtype)


def test_decode_attention_of_a_batch_of_short_gqa_sequences_matches_the_torch_path():
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(16 * 512, 4, 256, generator=g).bfloat16()  # Qwen3-30B-A3B: 32 heads over 4, head 128
    k, v = cache[..., :128], cache[..., 128:]
    q = torch.randn(16, 32, 128, generator=g).bfloat16()
    starts, ends = [b * 512 + b for b in range(16)], [(b + 1) * 512 for b in range(16)]
    expected = torch.cat([
        attend_few_queries(q[b : b + 1], k[s:e], v[s:e], 128**-0.5, None) for b, (s, e) in enumerate(zip(starts, ends))
    ])  # fmt: skip
    actual = decode_ops.decode_attention(q, k, v, starts, ends, 128**-0.5)
    assert ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item() <= 2**-7


@pytest.fixture(scope="module")
def emulated_amx():
    """decode_ops built with a plain C++ stand-in for AMX's tile instructions: the tile path's data layout, tested
    on machines without AMX (on a machine with it, the ordinary build takes that path for bf16)."""
    return decode_ops.build_extension(("KRASIS_AMX_EMULATE",))


# (query heads, KV heads, key width, value width): MLA's latent (values within the key rows), and 16 query heads over
# each of 2 KV heads with separate values
TILE_LAYOUTS = {"mla": (16, 1, 576, 512), "gqa": (32, 2, 64, 96)}


@pytest.mark.parametrize("rows", ["rows", "pages", "shuffled"])
@pytest.mark.parametrize("layout", TILE_LAYOUTS)
def test_decode_attention_on_amx_tiles_equals_softmax_attention(emulated_amx, layout, rows):
    heads, kv_heads, dim, v_dim = TILE_LAYOUTS[layout]
    g = torch.Generator().manual_seed(3)
    if kv_heads == 1:
        cache = torch.randn(4096, dim, generator=g).bfloat16()
        k, v = cache[:, None, :], cache[:, None, :v_dim]
    else:
        cache = torch.randn(4096, kv_heads, dim + v_dim, generator=g).bfloat16()
        k, v = cache[..., :dim], cache[..., dim:]
    q = torch.randn(3, heads, dim, generator=g).bfloat16()
    starts, ends = [0, 5, 1000], [1, 1002, 4096]  # one row; blocks of 128 and an odd tail; several work items
    slots = {"rows": None, "pages": paged_slots(4096, 4), "shuffled": torch.randperm(4096, generator=g)}[rows]
    selected = [slice(s, e) if slots is None else slots[s:e] for s, e in zip(starts, ends)]
    expected = reference_attention(q, k, v, selected, dim**-0.5)
    no_slots = torch.empty(0, dtype=torch.long) if slots is None else slots
    actual = emulated_amx.decode_attention(q, k, v, no_slots, starts, ends, dim**-0.5)
    assert_attention_close(actual, expected, torch.bfloat16)


@pytest.mark.parametrize("build", ["default", "amx tiles"])
def test_decode_attention_gives_the_same_bits_on_any_thread_count(build, request):
    """Work items are claimed by whichever thread is free: which one computes an item must not change the bits."""
    rows = 5000 if build == "default" else 1500  # the emulated tiles are slow
    k, v = cache_views("mla", rows, torch.bfloat16)
    q = torch.randn(2, 16, 576).to(torch.bfloat16)
    if build == "default":
        attend = decode_ops.decode_attention
    else:
        ops, no_slots = request.getfixturevalue("emulated_amx"), torch.empty(0, dtype=torch.long)
        attend = lambda *args: ops.decode_attention(*args[:3], no_slots, *args[3:])  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attend(q, k, v, [0, 100], [rows, rows - 1000], 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, attend(q, k, v, [0, 100], [rows, rows - 1000], 0.1))


def test_decode_attention_refuses_what_it_cannot_read():
    k, v = cache_views("mla", 10, torch.float32)
    q = torch.randn(1, 16, 576)
    assert decode_ops.decode_attention(q, k, v, [0], [11], 1.0) is None  # past the cache
    assert decode_ops.decode_attention(q, k, v, [3], [3], 1.0) is None  # nothing to attend
    assert decode_ops.decode_attention(q.bfloat16(), k, v, [0], [10], 1.0) is None  # mixed dtypes
    assert decode_ops.decode_attention(q, k, v, [0], [2], 1.0, torch.tensor([0, 10])) is None  # a slot outside
    assert decode_ops.decode_attention(q[:, :15], k, v, [0], [10], 1.0) is not None  # 15 heads over 1 KV head
    assert decode_ops.decode_attention(q, k, v, [0, 0], [10, 10], 1.0) is None  # bounds for 2 sequences, 1 query


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_heads_matmul_equals_bmm_both_ways(rows, dtype):
    g = torch.Generator().manual_seed(0)
    kv_b = torch.randn(16, 256, 512, generator=g).to(dtype)  # MLA's kv_b_proj as [heads, nope + v, kv_lora]
    w_uk, w_uv = kv_b[:, :128], kv_b[:, 128:]
    q_nope = torch.randn(rows, 16, 192, generator=g).to(dtype)[..., :128]  # a strided view, as the layer splits it
    latent = torch.randn(rows, 16, 512, generator=g).to(dtype)
    bound = 1e-6 if dtype == torch.float32 else 2**-8
    for x, w, transposed in ((q_nope, w_uk, False), (latent, w_uv, True)):
        expected = torch.bmm(x.double().transpose(0, 1), w.double().transpose(1, 2) if transposed else w.double())
        actual = decode_ops.heads_matmul(x, w, transposed)
        assert actual.dtype == dtype and actual.shape == expected.transpose(0, 1).shape
        assert ((actual.double() - expected.transpose(0, 1)).abs().max() / expected.abs().max()).item() <= bound


def test_heads_matmul_leaves_prefill_sized_inputs_to_bmm():
    w = torch.randn(2, 40, 70)
    assert decode_ops.heads_matmul(torch.randn(17, 2, 40), w, False) is None
    assert decode_ops.heads_matmul(torch.randn(3, 2, 41), w, False) is None  # K does not match
    assert decode_ops.heads_matmul(torch.randn(3, 2, 70), w, True).shape == (3, 2, 40)


def test_bf16_rms_norm_kernel_equals_the_torch_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 2048, generator=g) * 3).to(torch.bfloat16)
    norm = RMSNorm(2048, 1e-6)
    norm.weight.data = torch.randn(2048, generator=g).to(torch.bfloat16)
    expected = norm.weight * torch.rms_norm(x.float(), (2048,), eps=1e-6).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)
    y = torch.randn(5, 2048, generator=g).to(torch.bfloat16)
    total, normed = norm.add_and_norm(x, y)
    assert torch.equal(total, x + y)
    assert torch.equal(normed, norm.weight * torch.rms_norm(total.float(), (2048,), eps=1e-6).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_rotary_kernel_equals_the_torch_formula_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 17, 192, generator=g).to(dtype)[..., 128:]  # a strided rope part, many tokens (threads)
    angles = torch.rand(300, 32, generator=g) * 6
    cos, sin = interleaved_tables(angles.cos(), angles.sin())
    x32 = x.float()
    expected = (x32 * cos + x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin).to(dtype)
    assert torch.equal(decode_ops.rotary_interleaved(x, cos, sin), expected)


def test_failed_build_warns_and_leaves_the_torch_formulas(monkeypatch):
    monkeypatch.setattr(decode_ops, "build_extension", lambda: (_ for _ in ()).throw(RuntimeError("no compiler")))
    decode_ops.ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU decode kernels unavailable"):
            assert decode_ops.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6) is None
        norm = RMSNorm(4)
        assert torch.equal(norm(torch.ones(1, 4, dtype=torch.bfloat16)), torch.ones(1, 4, dtype=torch.bfloat16))
    finally:
        decode_ops.ops.cache_clear()
