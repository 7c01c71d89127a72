"""Prefill attention of a chunk over a longer context through cuDNN (past keys and own keys, merged by log-sum-exp)
equals SDPA's lower-right causal kernel within bf16 tolerance."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from krasis.common.layers.attention import attend, attend_chunk_cudnn, cudnn_attention_runs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("heads, qk, v, queries, context", [(16, 192, 128, 300, 1000), (8, 128, 128, 64, 4096)])
def test_a_chunk_over_a_longer_context_attends_as_the_lower_right_causal_kernel(heads, qk, v, queries, context):
    assert cudnn_attention_runs(torch.device("cuda"))  # the H100 machine has it: the test must not pass vacuously
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, queries, qk, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, heads, context, qk, device="cuda", dtype=torch.bfloat16, generator=gen)
    values = torch.randn(1, heads, context, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = qk**-0.5
    expected = F.scaled_dot_product_attention(q.float(), k.float(), values.float(), scale=scale,
                                              attn_mask=causal_lower_right(queries, context))  # fmt: skip
    got = attend_chunk_cudnn(q, k, values, scale)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    # the 3-d entry point the layers call takes the same path
    through_attend = attend(q[0].transpose(0, 1), k[0].transpose(0, 1), values[0].transpose(0, 1), scale,
                            causal_lower_right(queries, context))  # fmt: skip
    torch.testing.assert_close(through_attend, got[0].transpose(0, 1), atol=0, rtol=0)
