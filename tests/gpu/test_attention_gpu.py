"""Prefill attention of a chunk over a longer context through cuDNN, block by block (the chunk's own keys, then the
past in blocks, merged by log-sum-exp), equals SDPA's lower-right causal attention within bf16 tolerance, and calls
cuDNN with query and key counts from a few buckets only (each new shape costs cuDNN a plan)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from krasis.common.kernels.gpu.softmax_merge import merge_partials
from krasis.common.layers import attention
from krasis.common.layers.attention import (
    PAST_BLOCK,
    QUERY_BUCKET,
    attend,
    attend_chunk_blockwise,
    cudnn_attention_runs,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "heads, qk, v, queries, context",
    [(16, 192, 128, 300, 300), (16, 192, 128, 300, 1000), (16, 192, 128, 512, 512 + PAST_BLOCK),
     (8, 128, 128, 64, 2 * PAST_BLOCK + 700)],
)
def test_a_chunk_attends_block_by_block_as_the_lower_right_causal_kernel(heads, qk, v, queries, context):
    assert cudnn_attention_runs(torch.device("cuda"))  # the lent GPUs have it: the test must not pass vacuously
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(queries, heads, qk, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(context, heads, qk, device="cuda", dtype=torch.bfloat16, generator=gen)
    values = torch.randn(context, heads, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = qk**-0.5
    as_4d = lambda t: t.float().transpose(0, 1).unsqueeze(0)  # noqa: E731
    expected = F.scaled_dot_product_attention(as_4d(q), as_4d(k), as_4d(values), scale=scale,
                                              attn_mask=causal_lower_right(queries, context))[0].transpose(0, 1)  # fmt: skip
    calls = []

    def blocks(start, stop):
        calls.append((start, stop))
        return k[start:stop], values[start:stop]

    got = attend_chunk_blockwise(q, blocks, context - queries, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (queries, heads, v)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    past = context - queries
    front = past % QUERY_BUCKET  # the square starts on a bucket boundary; the past before it goes in whole blocks
    assert calls[0] == (past - front, context) and len(calls) == 1 + -(-(past - front) // PAST_BLOCK)
    assert all(stop - start == PAST_BLOCK or stop == past - front for start, stop in calls[1:])
    # the 3-d entry point the GQA layers call takes the same path
    torch.testing.assert_close(attend(q, k, values, scale, causal_lower_right(queries, context)), got, atol=0, rtol=0)


@pytest.mark.parametrize("final", [False, True])
def test_the_fused_merge_computes_what_torch_computes(final):
    gen = torch.Generator(device="cuda").manual_seed(1)
    heads, queries, width = 4, 300, 128
    out = torch.randn(1, queries, heads, width, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    block_out = torch.randn(1, queries, heads, width, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    lse, block_lse = (torch.randn(1, heads, queries, 1, device="cuda", generator=gen) * 4 for _ in range(2))
    merged = torch.logaddexp(lse, block_lse)
    expected = out.float() * (lse - merged).exp() + block_out.float() * (block_lse - merged).exp()
    got, got_lse = merge_partials(out, lse.clone(), block_out, block_lse, final)
    if final:
        assert got_lse is None and got.shape == (queries, heads, width) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected[0].transpose(0, 1).to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    else:
        assert got.dtype == torch.float32 and got.shape == (1, heads, queries, width)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse, merged, atol=1e-5, rtol=1e-5)


def test_every_cudnn_call_takes_bucketed_query_and_key_counts(monkeypatch):
    shapes, call = [], attention.cudnn_attention

    def recording(q, k, v, scale, causal):
        shapes.append((q.shape[2], k.shape[2], causal))
        return call(q, k, v, scale, causal)

    monkeypatch.setattr(attention, "cudnn_attention", recording)
    for queries, past in [(1, 0), (300, 0), (257, 1000), (4096, 4096), (1000, PAST_BLOCK + 77)]:
        q = torch.zeros(queries, 2, 64, dtype=torch.bfloat16, device="cuda")
        kv = torch.zeros(past + queries, 2, 64, dtype=torch.bfloat16, device="cuda")
        attend_chunk_blockwise(q, lambda start, stop: (kv[start:stop], kv[start:stop]), past, 1.0)
    assert all(rows % QUERY_BUCKET == 0 and keys % QUERY_BUCKET == 0 for rows, keys, _ in shapes)
    assert all(rows == keys for rows, keys, causal in shapes if causal)
