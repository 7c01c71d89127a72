"""q8/q4 formats: error bounds, layout, spec parsing, shape checks and safetensors round trips."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from krasis.common.quant.formats import (
    QMAX,
    QuantizedWeight,
    QuantSpec,
    dequantize,
    pack_nibbles,
    quantize,
    unpack_nibbles,
)

SPECS = ["q8", "q8:g32", "q8:channel", "q4", "q4:g64", "q4:g128"]


def random_weight(kind: str, shape=(3, 40, 256), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "outliers":  # one in ~500 weights 300x larger, as in real checkpoints' outlier channels
        mask = torch.rand(shape, generator=g) < 2e-3
        w = torch.where(mask, w * 300, w)
    return w


def group_view(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    k = t.shape[-1]
    return t.reshape(*t.shape[:-1], -1, spec.group_for(k))


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("text", SPECS)
def test_round_trip_error_within_half_a_scale(text, kind):
    spec = QuantSpec.parse(text)
    w = random_weight(kind)
    qw = quantize(w, spec)
    scale = qw.scales.float().unsqueeze(-1)
    err = group_view((w - dequantize(qw)).abs(), spec)
    # q = round(w / s) with w / s computed in fp32 (relative error <= 2^-24, |w / s| <= qmax) and q * s
    # exact in fp32, so |w - q * s| <= s * (1/2 + qmax * 2^-24).
    assert (err <= scale * (0.5 + QMAX[spec.format] * 2**-24)).all()
    assert err.max() > 0.4 * scale.min()  # really rounded to the grid, not stored exactly


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("text", SPECS)
def test_scale_is_group_max_over_qmax_rounded_up_to_bf16(text, kind):
    spec = QuantSpec.parse(text)
    w = random_weight(kind)
    qw = quantize(w, spec)
    ideal = group_view(w, spec).abs().amax(-1) / QMAX[spec.format]
    scale = qw.scales.float()
    assert qw.scales.dtype == torch.bfloat16
    # Rounded up, never down (so no value clamps), by less than one bf16 step (8 significant bits):
    # an outlier coarsens only its own group.
    assert (scale >= ideal).all() and (scale <= ideal * (1 + 2**-7)).all()


def test_all_zero_group_dequantizes_to_exact_zeros():
    w = random_weight("random", (4, 128))
    w[1, 32:64] = 0
    qw = quantize(w, QuantSpec("q4"))
    assert qw.scales[1, 1] == 0
    assert torch.equal(dequantize(qw)[1, 32:64], torch.zeros(32))


@pytest.mark.parametrize("text", SPECS)
def test_storage_shapes_and_dtypes(text):
    spec = QuantSpec.parse(text)
    qw = quantize(random_weight("random", (2, 8, 256)), spec)
    group = spec.group_for(256)
    assert qw.shape == (2, 8, 256)
    if spec.format == "q8":
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (2, 8, 256)
    else:
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (2, 8, 128)
    assert qw.scales.shape == (2, 8, 256 // group)
    assert qw.nbytes == qw.qweight.numel() * qw.qweight.element_size() + qw.scales.numel() * 2


def test_q4_stores_even_element_in_low_nibble_plus_8():
    # scale = 7 / 7 = 1, so q = w and the stored nibble is w + 8.
    row = torch.zeros(32)
    row[:4] = torch.tensor([7.0, -7.0, 0.0, 3.0])
    qw = quantize(row.unsqueeze(0), QuantSpec("q4"))
    assert qw.scales.float().item() == 1.0
    assert qw.qweight[0, 0].item() == (7 + 8) | ((-7 + 8) << 4)
    assert qw.qweight[0, 1].item() == (0 + 8) | ((3 + 8) << 4)


def test_nibble_packing_round_trips():
    values = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(values)
    assert packed.shape == (5, 32)
    assert torch.equal(unpack_nibbles(packed), values)
    assert torch.equal(pack_nibbles(unpack_nibbles(packed)), packed)


def test_dequantize_gives_requested_dtype():
    qw = quantize(random_weight("random", (8, 128)), QuantSpec("q8"))
    deq = dequantize(qw, torch.bfloat16)
    assert deq.dtype == torch.bfloat16 and deq.shape == (8, 128)
    assert torch.equal(deq, dequantize(qw).to(torch.bfloat16))


@pytest.mark.parametrize(
    "shape, text, message",
    [
        ((8, 96), "q8", "(8, 96)"),  # K not a multiple of the 128 group
        ((8, 48), "q8:channel", "(8, 48)"),  # K not a multiple of 32
        ((8, 100), "q4", "(8, 100)"),
        ((256,), "q4", "(256,)"),  # not [..., N, K]
    ],
)
def test_quantize_rejects_shapes_that_dont_fit(shape, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize(torch.randn(shape), QuantSpec.parse(text))


def test_quantize_rejects_non_finite_and_integer_weights():
    w = torch.randn(4, 128)
    w[2, 5] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(w, QuantSpec("q8"))
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(4, 128, dtype=torch.int32), QuantSpec("q8"))


@pytest.mark.parametrize(
    "text, expected",
    [("q4", QuantSpec("q4", 32)), ("q8", QuantSpec("q8", 128)), ("q4:g64", QuantSpec("q4", 64)),
     ("q8:channel", QuantSpec("q8", 0)), (" Q8:G256 ", QuantSpec("q8", 256))],
)
def test_spec_parse_and_canonical_text(text, expected):
    spec = QuantSpec.parse(text)
    assert spec == expected
    assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["q3", "int4", "q4:g16", "q4:g0", "q4:gx", "q8:64", "q4:g48", ""])
def test_spec_parse_rejects_with_clear_message(text):
    with pytest.raises(ValueError, match="q4|group size"):
        QuantSpec.parse(text)


def test_tensors_round_trip_through_safetensors(tmp_path):
    qw = quantize(random_weight("random", (2, 16, 128)), QuantSpec("q4"))
    save_file(qw.tensors("layers.0.mlp.experts.gate_up_proj"), tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    back = QuantizedWeight.from_tensors("layers.0.mlp.experts.gate_up_proj", loaded, qw.spec, qw.shape)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.scales, qw.scales)
    assert torch.equal(dequantize(back), dequantize(qw))


def test_from_tensors_names_missing_and_misshapen_tensors():
    qw = quantize(random_weight("random", (16, 128)), QuantSpec("q4"))
    with pytest.raises(ValueError, match=r"w\.scales"):
        QuantizedWeight.from_tensors("w", {"w.qweight": qw.qweight}, qw.spec, qw.shape)
    with pytest.raises(ValueError, match=r"scales is torch.bfloat16 \(16, 4\), expected torch.bfloat16 \(16, 2\)"):
        QuantizedWeight.from_tensors("w", qw.tensors("w"), QuantSpec("q4", 64), qw.shape)
    with pytest.raises(ValueError, match="qweight is torch.uint8"):
        QuantizedWeight.from_tensors("w", qw.tensors("w"), QuantSpec("q8", 32), qw.shape)


def test_indexing_a_stack_gives_one_expert_view():
    w = random_weight("random", (3, 8, 128))
    qw = quantize(w, QuantSpec("q8"))
    assert qw[1].shape == (8, 128)
    assert torch.equal(dequantize(qw[1]), dequantize(qw)[1])
    assert qw[1].qweight.data_ptr() == qw.qweight[1].data_ptr()  # a view: no copy of the weights
