"""GPU prefill through a VRAM budget: streamed equals resident, GPU equals CPU, the budget holds, kernels are exact."""

import pytest
import torch

from krasis.common.kernels.gpu.dequant import dequantize_into, triton_available
from krasis.common.kernels.gpu.fused_moe import align_by_expert, fused_experts
from krasis.common.kernels.gpu.moe import grouped_experts, reference_experts
from krasis.common.kv_cache import KVCache
from krasis.common.protocol_pipeline import AddRequest
from krasis.common.quant.formats import QuantSpec, dequantize, quantize
from krasis.common.sampling import SamplingParams
from krasis.gpu_worker import kv_handoff
from krasis.gpu_worker.core import GpuPrefillCore
from krasis.gpu_worker.prefill_runner import build_prefill_runner, cpu_prefill
from krasis.bench.presets import DEEPSEEK_V2_LITE
from krasis.bench.random_model import TINY_DEEPSEEK_V2, random_model
from krasis.gpu_worker.vram_plan import GiB
from tests.unit.test_streaming_prefill import streaming_plan

pytestmark = pytest.mark.gpu
CONFIG = dict(TINY_DEEPSEEK_V2, num_hidden_layers=6)
PROMPT = [int(t) for t in torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))]


@pytest.mark.parametrize("quant", [None, "q4", "q8:g32"])
def test_gpu_prefill_logits_match_the_cpu_within_bf16(quant):
    model = random_model(CONFIG, torch.bfloat16, quant)
    runner = build_prefill_runner(model, "cuda", chunk_tokens=128, step_tokens=512)
    gpu = runner.model.compute_logits(runner.prefill_prompt(PROMPT)).cpu()
    cpu = model.compute_logits(cpu_prefill(model, PROMPT))
    err = ((gpu - cpu).norm(dim=-1) / cpu.norm(dim=-1)).median().item()
    assert err < 3e-2, f"median relative logit error {err:.3e}"
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("quant", [None, "q4"])
def test_streamed_logits_equal_resident(quant):
    model = random_model(CONFIG, torch.bfloat16, quant)
    resident = build_prefill_runner(model, "cuda", chunk_tokens=128, step_tokens=512)
    plan = streaming_plan(model, 128, step_tokens=512)  # the resident runner's chunks: the same GEMM shapes
    streamed = build_prefill_runner(model, "cuda", plan=plan)
    assert streamed.plan.streams and not resident.plan.streams
    assert torch.equal(streamed.prefill_prompt(PROMPT), resident.prefill_prompt(PROMPT))
    streamed.close()


def test_plan_never_exceeds_the_budget():
    """V2-Lite shape cut to 8 layers (2.2 GB of q4 experts), a 2.9 GiB budget: experts stream, peak reserved
    stays inside."""
    model = random_model(dict(DEEPSEEK_V2_LITE, num_hidden_layers=8), torch.bfloat16, "q4")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    budget = 2.9
    runner = build_prefill_runner(model, "cuda", vram_budget_gib=budget, chunk_tokens=2048, step_tokens=4096)
    assert runner.plan.streams, runner.plan.describe()
    prompt = torch.randint(0, 102400, (4096,)).tolist()
    runner.prefill_prompt(prompt)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_reserved() - base
    assert peak <= budget * GiB, f"peak reserved {peak / GiB:.2f} GiB over the {budget} GiB budget\n{runner.plan.describe()}"
    assert torch.cuda.max_memory_allocated() - base <= runner.plan.total_bytes
    runner.close()


@pytest.mark.parametrize("spec", ["q4:g32", "q8:g128", "q4:channel"])
@pytest.mark.parametrize("shape", [(6, 384, 256), (5, 77, 640)], ids=["whole-blocks", "ragged"])
def test_dequant_kernel_equals_dequantize(spec, shape):
    weight = torch.randn(*shape)
    qw = quantize(weight, QuantSpec.parse(spec))
    on_gpu = type(qw)(qw.spec, qw.shape, qw.qweight.cuda(), qw.scales.cuda())
    out = dequantize_into(on_gpu, torch.empty(qw.shape, dtype=torch.bfloat16, device="cuda"))
    assert triton_available()
    assert torch.equal(out.cpu(), dequantize(qw, torch.bfloat16))


def _expert_inputs(shape, quant, seed, scale=None):
    """Routed-expert inputs on the host: x [T, H] bf16, ids and weights [T, k], (gate_up, down) as the kernels take
    them (QuantizedWeight or bf16) and as bf16 floats (dequantized). shape: (experts, hidden, inter, tokens, k)."""
    experts, hidden, inter, tokens, k = shape
    gen = torch.Generator().manual_seed(seed)
    scale = scale or (hidden**0.5, inter**0.5)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / scale[0]
    down = torch.randn(experts, hidden, inter, generator=gen) / scale[1]
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    if not quant:
        floats = [gate_up.bfloat16(), down.bfloat16()]
        return x, ids, weights, floats, floats
    stored = [quantize(w, QuantSpec.parse(quant)) for w in (gate_up, down)]
    return x, ids, weights, stored, [dequantize(w, torch.bfloat16) for w in stored]


def _cuda(weight):
    if isinstance(weight, torch.Tensor):
        return weight.cuda()
    return type(weight)(weight.spec, weight.shape, weight.qweight.cuda(), weight.scales.cuda())


@pytest.mark.parametrize("quant", [None, "q4"])
def test_grouped_expert_gemms_equal_dequantize_then_matmul(quant):
    x, ids, weights, stored, floats = _expert_inputs((16, 256, 128, 1000, 4), quant, 0, scale=(16, 11))
    expected = reference_experts(x.cuda(), *[w.cuda() for w in floats], ids.cuda(), weights.cuda())
    got = grouped_experts(x.cuda(), *[_cuda(w) for w in stored], ids.cuda(), weights.cuda())
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def _fp64_experts(x, gate_up, down, ids, weights):
    """The exact function on bf16-rounded inputs, in float64: x [T, H], gate_up [E, 2I, H], down [E, H, I]."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    for e in ids.unique().tolist():
        tokens, slots = torch.where(ids == e)
        gate, up = (x[tokens] @ gate_up[e].t()).chunk(2, dim=-1)
        out.index_add_(0, tokens, (torch.nn.functional.silu(gate) * up) @ down[e].t() * weights[tokens, slots, None].double())
    return out


@pytest.mark.parametrize("quant", [None, "q4", "q4:g64", "q8:g128"])
@pytest.mark.parametrize("shape", [(16, 256, 128, 1000, 4), (64, 2048, 1408, 2048, 6), (8, 128, 128, 5, 3)],
                         ids=["small", "v2-lite", "tiny"])  # fmt: skip
def test_fused_experts_compute_the_reference_function(quant, shape):
    """Triton's fused dequant-GEMM experts against float64 on the same bf16/dequantized weights: no worse than the
    bf16 reference loop, no NaN from a poisoned freed block, and the same bits run to run."""
    _, hidden, inter, tokens, k = shape
    x, ids, weights, stored, floats = _expert_inputs(shape, quant, sum(shape))
    dev = [_cuda(w) for w in stored]
    exact = _fp64_experts(x, *floats, ids, weights)
    reference = reference_experts(x.cuda(), *[w.cuda() for w in floats], ids.cuda(), weights.cuda()).cpu()
    torch.cuda.empty_cache()
    poison = torch.full((8 * tokens * k * max(hidden, inter),), float("nan"), dtype=torch.bfloat16, device="cuda")
    del poison  # the kernels' buffers come from this freed block: an unwritten element stays NaN
    got = fused_experts(x.cuda(), *dev, ids.cuda(), weights.cuda())
    again = fused_experts(x.cuda(), *dev, ids.cuda(), weights.cuda())
    assert torch.equal(got, again)
    got = got.cpu()
    assert not got.isnan().any()
    rel = lambda out: ((out.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(got) <= 1.25 * rel(reference) + 1e-3, f"fused {rel(got):.2e}, reference {rel(reference):.2e}"


def test_align_by_expert_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([[3, 0], [0, 1], [3, 0], [2, 3]], device="cuda")
    rows, block_expert = align_by_expert(ids, num_experts=5, block_m=2)
    rows, block_expert = rows.cpu().tolist(), block_expert.cpu().tolist()
    pad = ids.numel()
    # expert 0: pairs 1, 2, 5; expert 1: 3; expert 2: 6; expert 3: 0, 4, 7; expert 4: none
    assert rows[:12] == [1, 2, 5, pad, 3, pad, 6, pad, 0, 4, 7, pad]
    assert block_expert[:6] == [0, 0, 1, 2, 3, 3] and all(e == 5 for e in block_expert[6:])
    assert all(r == pad for r in rows[12:])


@pytest.mark.parametrize("fragmented", [False, True], ids=["direct-runs", "gathered"])
def test_streamed_core_hands_the_pool_the_kv_of_the_resident_core(fragmented, monkeypatch):
    """Per-layer KV staging on the GPU, copies into a registered host pool overlapping the next layers: the pool
    ends up bit-identical to an all-resident run's (buffers reused only after their copies finished)."""
    if fragmented:
        monkeypatch.setattr(kv_handoff, "MAX_DIRECT_RUNS", 1)
    model = random_model(CONFIG, torch.bfloat16, "q4")
    runners = [build_prefill_runner(model, "cuda", chunk_tokens=128, step_tokens=512),
               build_prefill_runner(model, "cuda", plan=streaming_plan(model, 128, step_tokens=512))]  # fmt: skip
    assert runners[1].plan.streams and runners[1].plan.chunk_tokens == 128
    pools = []
    for runner in runners:
        pool = KVCache.allocate(model.kv_widths, 40, 16, torch.bfloat16, "cpu")
        pool.layers = [page_aligned(t) for t in pool.layers]  # pages of its own, as a shared-memory pool has
        core = GpuPrefillCore(runner.model, pool, frozenset(), model.config.vocab_size, 512, runner=runner)
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        core.add(AddRequest("a", PROMPT, params, list(range(20))))
        core.add(AddRequest("b", PROMPT[:100], params, [39, 30, 31, 25, 26, 27, 28]))
        while core.has_work:
            core.step()
        assert core.staging.hand_off.pool_registered  # copies went straight into the pool's pages
        core.close()
        runner.close()
        pools.append(pool)
    assert pools[0].layers[1].count_nonzero() > 0
    for resident, streamed in zip(*[p.layers for p in pools]):
        assert torch.equal(streamed, resident)


def page_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A zeroed copy of `tensor` on whole pages of its own storage (a small tensor's own pages sit in the malloc heap
    beside other objects, which the hand-off's registration must not pin)."""
    page = 4096
    raw = torch.zeros(tensor.nbytes + 2 * page, dtype=torch.uint8)
    start = -raw.data_ptr() % page
    return raw[start : start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)


@pytest.mark.parametrize("quant", ["q4", "q4:g64", "q8:g128"])
@pytest.mark.parametrize("shape", [(16, 256, 128, 1000, 4), (64, 2048, 1408, 4096, 6)], ids=["small", "v2-lite"])
def test_experts_dequantized_first_equal_the_bf16_kernels_on_the_dequantized_weights(quant, shape):
    """Quantized experts dequantized a block at a time (five experts a block here), then the bf16 kernels over each
    block's rows: the same bits as the bf16 kernels over all experts' dequantized weights, run to run, and within
    the tile-dequantizing kernels' error of float64."""
    experts, hidden, inter, _, _ = shape
    x, ids, weights, stored, floats = _expert_inputs(shape, quant, 7)
    args = (x.cuda(), *[_cuda(w) for w in stored], ids.cuda(), weights.cuda())
    five_experts = 5 * 3 * inter * hidden * 2
    first = fused_experts(*args, dequantize_first=True, scratch_bytes=five_experts)
    assert torch.equal(first, fused_experts(*args, dequantize_first=True, scratch_bytes=five_experts))
    bf16 = fused_experts(x.cuda(), *[w.cuda() for w in floats], ids.cuda(), weights.cuda())
    assert torch.equal(first, bf16)
    exact = _fp64_experts(x, *floats, ids, weights)
    rel = lambda out: ((out.cpu().double() - exact).norm() / exact.norm()).item()  # noqa: E731
    in_tiles = fused_experts(*args, dequantize_first=False)
    assert rel(first) <= 1.25 * rel(in_tiles) + 1e-3, f"first {rel(first):.2e}, in tiles {rel(in_tiles):.2e}"

