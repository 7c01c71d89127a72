"""Prefill's fused row-wise kernels compute what the torch ops they replace compute: the RMSNorm (with its residual
add) within a bf16 rounding of them; the sum, the interleaved rotary and MLA's expanded keys and values bit for bit."""

import pytest
import torch

from krasis.common.kernels.gpu import rowwise
from krasis.common.layers.norm import RMSNorm
from krasis.common.layers.rotary import apply_rotary_interleaved, interleaved_tables, rotate_interleaved_

pytestmark = pytest.mark.gpu


def torch_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.forward's torch ops."""
    return weight * torch.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def assert_within_a_rounding(got: torch.Tensor, expected: torch.Tensor):
    """Equal but for a few elements, and those one bf16 rounding apart (the sum of squares runs in another order)."""
    differ = got != expected
    assert differ.float().mean() < 1e-3
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2**-7)


@pytest.mark.parametrize("rows, hidden", [(1, 2048), (301, 2048), (64, 512), (7, 1000)])
def test_the_fused_norm_and_add_compute_what_torch_computes(rows, hidden):
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = (torch.randn(rows, hidden, device="cuda", generator=gen) * 3).bfloat16()
    y = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
    weight = (1 + torch.randn(hidden, device="cuda", generator=gen) / 4).bfloat16()
    assert rowwise.rms_norm_fits(x, weight) and rowwise.rms_norm_fits(x, weight, y)
    strided = torch.zeros(rows, 2 * hidden, device="cuda").bfloat16()[:, ::2]
    assert not rowwise.rms_norm_fits(x, weight, strided)  # a residual of strided elements takes torch's ops
    assert_within_a_rounding(rowwise.rms_norm(x, weight, 1e-6), torch_norm(x, weight, 1e-6))
    total, normed = rowwise.rms_norm(x, weight, 1e-6, residual=y)
    assert torch.equal(total, x + y)
    assert_within_a_rounding(normed, torch_norm(x + y, weight, 1e-6))


def test_the_norm_module_takes_the_fused_kernel_for_strided_bf16_rows():
    norm = RMSNorm(512).cuda().bfloat16()
    latent = torch.randn(100, 1, 576, device="cuda").bfloat16()[..., :512]  # MLA's latent, a view of [T, 1, 576]
    got = norm(latent)
    assert got.shape == (100, 1, 512) and got.is_contiguous()
    assert_within_a_rounding(got, torch_norm(latent, norm.weight, norm.eps))


@pytest.mark.parametrize("heads", [16, 1, 12])
def test_rotating_in_place_equals_the_torch_rotary_bit_for_bit(heads):
    gen = torch.Generator(device="cuda").manual_seed(heads)
    tokens, nope, rope = 77, 128, 64
    q = torch.randn(tokens, heads, nope + rope, device="cuda", generator=gen).bfloat16()
    positions = torch.arange(1000, 1000 + tokens, device="cuda").float()
    freqs = positions[:, None] / 10000 ** (torch.arange(0, rope, 2, device="cuda") / rope)
    tables = interleaved_tables(freqs.cos(), freqs.sin())
    expected = apply_rotary_interleaved(q[..., nope:].clone(), tables)
    before = q[..., :nope].clone()
    assert rowwise.rotary_fits(q[..., nope:], *tables)
    assert rotate_interleaved_(q[..., nope:], tables).data_ptr() == q[..., nope:].data_ptr()
    assert torch.equal(q[..., nope:], expected)
    assert torch.equal(q[..., :nope], before)  # the rest of each row untouched


@pytest.mark.parametrize("tokens", [1, 301])
def test_expanded_keys_and_values_equal_the_torch_cat(tokens):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    heads, nope, rope, v_dim, rank = 16, 128, 64, 128, 512
    kv = torch.randn(tokens, heads * (nope + v_dim), device="cuda", generator=gen).bfloat16()
    cached = torch.randn(tokens, rank + rope, device="cuda", generator=gen).bfloat16()
    k_pe = cached[:, rank:]  # strided, as MLA's cached rows give it
    assert rowwise.expand_fits(kv, k_pe, nope, v_dim)
    k, v = rowwise.expand_latent(kv, k_pe, heads, nope, v_dim)
    k_nope, v_expected = kv.view(tokens, heads, nope + v_dim).split([nope, v_dim], dim=-1)
    assert k.is_contiguous() and v.is_contiguous()
    assert torch.equal(k, torch.cat((k_nope, k_pe[:, None, :].expand(-1, heads, -1)), dim=-1))
    assert torch.equal(v, v_expected)
