"""CPU decode kernels: quant kernels equal dequantize-then-matmul, for both formats, x dtypes and row counts; the
bf16 kernel equals a float reference (and F.linear) within bf16 rounding.

q4 kernels multiply activations rounded to int8 per 32 values (`kernel_input`); the references round the same way.
"""

import platform
import warnings

import pytest
import torch
import torch.nn.functional as F

from krasis.common.quant import cpu_kernels
from krasis.common.quant.cpu_kernels import (
    DENSE_MAX_ROWS,
    bf16_backend,
    bf16_linear,
    int8_activations,
    kernel_backend,
    kernel_input,
    quant_experts,
    quant_linear,
)
from krasis.common.quant.formats import QuantizedWeight, QuantSpec, dequantize, quantize
from krasis.common.quant.modules import DecodeLinear, QuantLinear, swap_in_quantized

SPECS = ["q8", "q8:channel", "q4", "q4:g128"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_weight(spec: str, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(shape, generator=g) / shape[-1] ** 0.5, QuantSpec.parse(spec))


def assert_close_to_fp64(actual, x, weight64, expected64):
    """fp32 accumulation in any order is within K * 2^-24 * sum|x * w| of the exact sum; bf16 adds one rounding."""
    bound = x.shape[-1] * 2**-24 * (x.double().abs() @ weight64.abs().T)
    if actual.dtype == torch.bfloat16:
        bound = bound + 2**-8 * expected64.abs()
    assert ((actual.double() - expected64).abs() <= bound).all(), (actual.double() - expected64).abs().max()


def test_kernel_backend_is_the_compiled_extension():
    assert kernel_backend() in ("cpp-avx512", "cpp-avx2", "cpp-scalar")
    assert bf16_backend() in ("cpp-avx512bf16", "cpp-avx512", "cpp-avx2", "cpp-scalar")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
# K=224 (7 chunks of 32) and 192 at g64 end in chunks that fill no whole SIMD block
@pytest.mark.parametrize("spec,k", [(spec, 256) for spec in SPECS] + [("q4", 224), ("q4:g64", 192), ("q8:channel", 224)])
def test_quant_linear_equals_dequantized_matmul(spec, k, m, dtype):
    qw = make_weight(spec, (70, k))  # 70 rows: a ragged last row tile
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    y = quant_linear(x, qw)
    weight64, x_in = dequantize(qw).double(), kernel_input(x, qw)
    assert y.dtype == x.dtype and y.shape == (m, 70)
    assert_close_to_fp64(y, x_in, weight64, x_in.double() @ weight64.T)


def test_int8_activations_round_each_32_values_to_their_own_scale():
    x = torch.cat([torch.linspace(-1, 1, 32), torch.zeros(32), 1000 * torch.randn(32)])[None]
    rounded = int8_activations(x)
    for chunk, out in zip(x.view(3, 32), rounded.view(3, 32)):
        d = chunk.abs().max() / 127
        assert torch.equal(out, torch.round(chunk / d) * d if d > 0 else chunk)
        assert (out - chunk).abs().max() <= d / 2 * (1 + 1e-6)


def test_quant_linear_accepts_a_non_contiguous_x():
    qw = make_weight("q4", (8, 128))
    x = torch.randn(128, 4).T
    weight64, x_in = dequantize(qw).double(), kernel_input(x, qw)
    assert_close_to_fp64(quant_linear(x, qw), x_in, weight64, x_in.double() @ weight64.T)


def test_quant_linear_module_gives_every_leading_shape_the_rows_of_the_2d_call():
    qw = make_weight("q4", (8, 128))
    bias = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16), requires_grad=False)
    layer = QuantLinear(qw, bias)
    x = torch.randn(6, 128).to(torch.bfloat16)
    rows = quant_linear(x, qw) + bias
    assert torch.equal(layer(x), rows)
    assert torch.equal(layer(x.view(2, 3, 128)), rows.view(2, 3, 8))
    assert torch.equal(layer(x[0]), rows[0])


def test_quant_linear_rejects_mismatched_x():
    qw = make_weight("q8", (8, 128))
    with pytest.raises(ValueError, match=r"x \(2, 64\) does not match weight \(8, 128\)"):
        quant_linear(torch.randn(2, 64), qw)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        quant_linear(torch.randn(2, 128, dtype=torch.float64), qw)


def reference_experts(x, gate_up, down, topk_ids, topk_weights):
    """Pair by pair in fp64: weight * down(silu(gate x) * up x), summed over the k slots."""
    gu64, dn64 = dequantize(gate_up).double(), dequantize(down).double()
    inter = dn64.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    x_in = kernel_input(x, gate_up).double()
    for t in range(x.shape[0]):
        for e, w in zip(topk_ids[t].tolist(), topk_weights[t].double().tolist()):
            h = gu64[e] @ x_in[t]
            act = kernel_input((F.silu(h[:inter]) * h[inter:])[None], down)[0].double()
            out[t] += w * (dn64[e] @ act)
    return out


def expert_tolerance(down: QuantizedWeight, dtype: str) -> float:
    """Relative to the largest output. A q4 down rounds the fp32 activation to int8, and the kernel's and the
    reference's activations differ in their last bits, so an element may round one step apart (~2e-3 of the
    output); a wrong expert, token or weight is off by O(1)."""
    return max(2e-5 if dtype == "fp32" else 2**-8, 5e-3 if down.spec.format == "q4" else 0)


EXPERT_ROUTES = {
    # experts 1 and 2 are hit by three tokens, token 2's experts (5, 6, 7) by no other token
    "shared_and_private": [[1, 2, 3], [2, 1, 4], [5, 6, 7], [0, 1, 2]],
    "single_token": [[3, 0, 6]],
    "all_tokens_one_expert": [[4], [4], [4], [4], [4], [4]],  # more tokens than a tile's rows
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specs", [("q4", "q4"), ("q8", "q8"), ("q8:channel", "q4:g64")])
@pytest.mark.parametrize("route", EXPERT_ROUTES)
def test_quant_experts_equals_per_expert_reference(route, specs, dtype):
    num_experts, hidden, inter = 8, 256, 128
    gate_up = make_weight(specs[0], (num_experts, 2 * inter, hidden), seed=2)
    down = make_weight(specs[1], (num_experts, hidden, inter), seed=3)
    topk_ids = torch.tensor(EXPERT_ROUTES[route])
    g = torch.Generator().manual_seed(4)
    topk_weights = torch.rand(topk_ids.shape, generator=g)
    x = torch.randn(topk_ids.shape[0], hidden, generator=g).to(DTYPES[dtype])
    y = quant_experts(x, gate_up, down, topk_ids, topk_weights)
    expected = reference_experts(x, gate_up, down, topk_ids, topk_weights)
    assert y.dtype == x.dtype and y.shape == x.shape
    # Two fp32 matmuls and an fp32 activation in between; a wrong expert, token or weight is off by O(1).
    tolerance = expert_tolerance(down, dtype) * expected.abs().max()
    assert (y.double() - expected).abs().max() <= tolerance


def test_quant_experts_gives_the_same_bits_on_any_thread_count():
    """Every output element is summed in one fixed order (experts, then pairs, ascending) by whichever thread
    owns its columns, so oversubscribed threads waiting on each other change nothing."""
    num_experts, hidden, inter, tokens, top_k = 16, 256, 160, 7, 4
    gate_up = make_weight("q4", (num_experts, 2 * inter, hidden), seed=11)
    down = make_weight("q4", (num_experts, hidden, inter), seed=12)
    g = torch.Generator().manual_seed(13)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            results.append(quant_experts(x, gate_up, down, topk_ids, topk_weights))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.slow
def test_quant_experts_work_plans_give_the_same_bits():
    """The default plan at 1, 3 and 8 threads (items of several sizes, spanning experts) and items of 32 rows
    change who computes what, never a value: each pair's down rows and each token's sum over its pairs keep their
    order."""
    num_experts, hidden, inter, tokens, top_k = 16, 256, 160, 5, 4
    gate_up = make_weight("q4", (num_experts, 2 * inter, hidden), seed=21)
    down = make_weight("q4", (num_experts, hidden, inter), seed=22)
    g = torch.Generator().manual_seed(23)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    q4 = cpu_kernels.FORMAT_CODES["q4"]
    args = (torch.randn(tokens, hidden, generator=g).to(torch.bfloat16), gate_up.qweight, gate_up.scales, q4, 32,
            down.qweight, down.scales, q4, 32, topk_ids, torch.rand(tokens, top_k, generator=g))  # fmt: skip
    small_items = cpu_kernels.build_extension(
        defines=("KRASIS_MOE_GUIDE=0", "KRASIS_MOE_ITEMS_PER_THREAD=1000")
    )
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            results += [cpu_kernels._ops().experts(*args)[0], small_items.experts(*args)[0]]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_quant_experts_over_many_random_tokens():
    num_experts, hidden, inter, tokens, top_k = 16, 128, 96, 16, 4
    gate_up = make_weight("q4", (num_experts, 2 * inter, hidden), seed=5)
    down = make_weight("q4", (num_experts, hidden, inter), seed=6)
    g = torch.Generator().manual_seed(7)
    topk_ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    topk_weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    x = torch.randn(tokens, hidden, generator=g)
    expected = reference_experts(x, gate_up, down, topk_ids, topk_weights)
    y = quant_experts(x, gate_up, down, topk_ids, topk_weights)
    assert (y.double() - expected).abs().max() <= expert_tolerance(down, "fp32") * expected.abs().max()


@pytest.mark.parametrize("bad", [4, -1])
@pytest.mark.parametrize("use_torch", [False, True])
def test_quant_experts_rejects_unknown_expert(use_torch, bad, monkeypatch):
    if use_torch:
        monkeypatch.setattr(cpu_kernels, "_ops", lambda: None)
    gate_up, down = make_weight("q4", (4, 64, 64)), make_weight("q4", (4, 64, 32))
    with pytest.raises(ValueError, match=f"topk_ids holds expert {bad}; there are 4"):
        quant_experts(torch.randn(1, 64), gate_up, down, torch.tensor([[0, bad]]), torch.ones(1, 2))


def test_quant_experts_rejects_routing_tensors_the_kernel_cannot_read():
    gate_up, down = make_weight("q4", (4, 64, 64), seed=8), make_weight("q4", (4, 64, 32), seed=9)
    with pytest.raises(ValueError, match="the kernel cannot read .* topk_ids torch.float32"):
        quant_experts(torch.randn(1, 64), gate_up, down, torch.tensor([[0.0, 1.0]]), torch.ones(1, 2))


def test_kernels_reject_non_contiguous_weights():
    qw = make_weight("q8", (8, 128))
    strided = QuantizedWeight(qw.spec, qw.shape, qw.qweight.T.contiguous().T, qw.scales)
    with pytest.raises(ValueError, match="must be contiguous CPU tensors"):
        quant_linear(torch.randn(1, 128), strided)
    gate_up, down = make_weight("q4", (4, 64, 64)), make_weight("q4", (4, 64, 32))
    strided = QuantizedWeight(gate_up.spec, gate_up.shape, gate_up.qweight.transpose(1, 2).contiguous().transpose(1, 2),
                              gate_up.scales)  # fmt: skip
    with pytest.raises(ValueError, match="must be contiguous CPU tensors"):
        quant_experts(torch.randn(1, 64), strided, down, torch.tensor([[0]]), torch.ones(1, 1))


def test_quant_experts_rejects_mismatched_stacks():
    gate_up, down = make_weight("q4", (4, 64, 64)), make_weight("q4", (3, 64, 32))
    with pytest.raises(ValueError, match=r"\[E, 2I, H\] and \[E, H, I\]"):
        quant_experts(torch.randn(1, 64), gate_up, down, torch.tensor([[0]]), torch.ones(1, 1))


def test_torch_fallback_gives_the_same_results(monkeypatch):
    qw = make_weight("q4", (40, 128))
    gate_up, down = make_weight("q8", (6, 128, 128)), make_weight("q4", (6, 128, 64))
    x = torch.randn(5, 128)
    topk_ids, topk_weights = torch.tensor([[0, 1], [1, 2], [3, 4], [1, 5], [0, 2]]), torch.rand(5, 2)
    compiled = quant_linear(x, qw), quant_experts(x, gate_up, down, topk_ids, topk_weights)
    monkeypatch.setattr(cpu_kernels, "_ops", lambda: None)
    assert kernel_backend() == "torch"
    fallback = quant_linear(x, qw), quant_experts(x, gate_up, down, topk_ids, topk_weights)
    for a, b in zip(compiled, fallback):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_failed_build_warns_in_one_line_and_falls_back(monkeypatch):
    def failing_build(march="native"):
        raise RuntimeError("Error building extension 'k': [1/2] c++ -O3 -march=native k.cpp\nk.cpp:1:1: error: boom")

    monkeypatch.setattr(cpu_kernels, "build_extension", failing_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_kernels._load_or_warn() is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "error: boom" in message and "dequantize-then-matmul" in message


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for the x86-64 baseline")
def test_portable_build_uses_scalar_path_and_matches():
    ops = cpu_kernels.build_extension(march="x86-64")  # no AVX2: the scalar path, as on any other CPU
    assert ops.isa() == "scalar"
    qw = make_weight("q4", (70, 256))
    x = torch.randn(3, 256)
    y = ops.linear(x, qw.qweight, qw.scales, cpu_kernels.FORMAT_CODES["q4"], 32)
    weight64, x_in = dequantize(qw).double(), kernel_input(x, qw)
    assert_close_to_fp64(y, x_in, weight64, x_in.double() @ weight64.T)
    assert ops.bf16_isa() == "scalar"
    x, weight, bias = bf16_inputs(3, 200, 70, bias=True)
    assert_bf16_linear_exact(ops.dense_bf16(x, weight, bias, 3), x, weight, bias)


def test_empty_batch_gives_empty_output():
    qw = make_weight("q4", (8, 128))
    assert quant_linear(torch.randn(0, 128), qw).shape == (0, 8)
    gate_up, down = make_weight("q4", (4, 64, 128)), make_weight("q4", (4, 128, 32))
    out = quant_experts(torch.randn(0, 128), gate_up, down, torch.zeros(0, 2, dtype=torch.long), torch.ones(0, 2))
    assert out.shape == (0, 128)


def bf16_inputs(m: int, k: int, n: int, bias: bool, seed: int = 20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    return x, weight, (torch.randn(n, generator=g).to(torch.bfloat16) if bias else None)


def assert_bf16_linear_exact(y, x, weight, bias):
    """Against the fp64 product of the same bf16 values: fp32 sums in any order, then one bf16 rounding."""
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    bound = x.shape[1] * 2**-24 * (x.double().abs() @ weight.double().abs().T) + 2**-8 * expected.abs()
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    assert ((y.double() - expected).abs() <= bound).all(), (y.double() - expected).abs().max()


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16])
# N=70: a ragged last tile; N=3: fewer rows than a tile; K=200: not a multiple of any SIMD step; K=2048: V2-Lite
@pytest.mark.parametrize("k,n", [(256, 70), (200, 3), (2048, 40)])
def test_bf16_linear_equals_float_reference(k, n, m, bias):
    x, weight, b = bf16_inputs(m, k, n, bias)
    y = bf16_linear(x, weight, b)
    assert_bf16_linear_exact(y, x, weight, b)
    # and F.linear's result to within a rounding step of bf16 (both sum in fp32, in different orders)
    reference = F.linear(x, weight, b).double()
    assert ((y.double() - reference).abs() <= 2**-7 * reference.abs() + 1e-6).all()


def test_bf16_linear_rejects_what_it_cannot_read():
    x, weight, _ = bf16_inputs(2, 64, 8, bias=False)
    with pytest.raises(ValueError, match=r"x \(2, 32\) and weight \(8, 64\)"):
        bf16_linear(x[:, :32], weight)
    with pytest.raises(ValueError, match="bf16 CPU tensors"):
        bf16_linear(x.float(), weight)
    with pytest.raises(ValueError, match=r"bias \(7,\)"):
        bf16_linear(x, weight, torch.zeros(7, dtype=torch.bfloat16))


def test_bf16_linear_falls_back_to_f_linear(monkeypatch):
    x, weight, b = bf16_inputs(3, 128, 16, bias=True)
    monkeypatch.setattr(cpu_kernels, "_ops", lambda: None)
    assert torch.equal(bf16_linear(x, weight, b), F.linear(x, weight, b))


def decode_linear(k: int, n: int, bias: bool, dtype=torch.bfloat16) -> DecodeLinear:
    layer = torch.nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
    layer.__class__ = DecodeLinear
    return layer


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_decode_linear_takes_the_kernel_up_to_16_rows_and_f_linear_above(bias):
    layer = decode_linear(256, 48, bias)
    for shape in [(1, 256), (2, 8, 256), (DENSE_MAX_ROWS, 256)]:
        x = torch.randn(shape).to(torch.bfloat16)
        y = layer(x)
        assert y.shape == (*shape[:-1], 48)
        assert torch.equal(y.reshape(-1, 48), bf16_linear(x.reshape(-1, 256), layer.weight, layer.bias))
        assert_bf16_linear_exact(y.reshape(-1, 48), x.reshape(-1, 256), layer.weight, layer.bias)
    x = torch.randn(DENSE_MAX_ROWS + 1, 256).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_decode_linear_leaves_fp32_and_autograd_to_f_linear():
    layer = decode_linear(64, 8, bias=True, dtype=torch.float32)
    x = torch.randn(1, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer = decode_linear(64, 8, bias=False).requires_grad_(True)
    x = torch.randn(1, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.requires_grad and torch.equal(y, F.linear(x, layer.weight))


def test_swap_in_quantized_routes_the_unquantized_linears_but_not_routers():
    model = torch.nn.Module()
    model.self_attn = torch.nn.Module()
    model.self_attn.q_proj, model.self_attn.o_proj = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    model.mlp = torch.nn.Module()
    model.mlp.gate = torch.nn.Linear(64, 4, bias=False)
    model.lm_head = torch.nn.Linear(64, 100, bias=False)
    swap_in_quantized(model, {"self_attn.o_proj.weight": quantize(torch.randn(64, 64), QuantSpec("q8", 32))})
    assert type(model.self_attn.q_proj) is DecodeLinear and type(model.lm_head) is DecodeLinear
    assert type(model.mlp.gate) is torch.nn.Linear
    assert type(model.self_attn.o_proj).__name__ == "QuantLinear"
