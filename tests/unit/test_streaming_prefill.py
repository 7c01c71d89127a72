"""The streaming prefill executor on the CPU: the same logic as on the GPU (buffers, groups, chunks, hand-off)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from krasis.common.kernels.gpu.moe import grouped_experts, reference_experts
from krasis.common.kv_cache import KVCache
from krasis.common.quant.formats import QuantSpec, dequantize, quantize
from krasis.gpu_worker.device_model import DeviceQuantLinear, activation_shape, build_device_model, measure_weights
from krasis.gpu_worker import kv_handoff
from krasis.gpu_worker.kv_handoff import KVHandOff
from krasis.gpu_worker.prefill_runner import CpuPrefillRoute, build_prefill_runner, cpu_prefill
from krasis.bench import presets
from krasis.bench.presets import QWEN3_CODER_NEXT
from krasis.bench.random_weights import bench_model_dir, ensure_random_cache
from krasis.common.model_loader import load_model
from krasis.common.quant.modules import QuantLinear
from krasis.common.quant.plan import QuantPlan
from krasis.bench.random_model import TINY_DEEPSEEK_V2, random_model
from krasis.common.engine import EngineConfig, EngineCore
from krasis.common.sampling import SamplingParams
from krasis.gpu_worker.core import GpuPrefillCore
from krasis.gpu_worker.prefill_cost import PrefillRates
from krasis.gpu_worker.vram_plan import plan_vram

CONFIG = dict(TINY_DEEPSEEK_V2, num_hidden_layers=6)  # 5 MoE layers: some resident, some streamed
TINY_QWEN3_NEXT = dict(  # 3 Gated DeltaNet layers and 1 full attention, layer 1 dense
    QWEN3_CODER_NEXT, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, mlp_only_layers=[1], max_position_embeddings=256,
)  # fmt: skip
PROMPT = [int(t) for t in torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1))]


def streaming_plan(model, chunk_tokens, resident_layers=0, group_layers=1, step_tokens=64):
    """A plan whose budget holds the resident set, two buffers and nothing more: experts must stream."""
    # the embedding bound to the device: else the planner would move it to the host to keep every expert resident
    weights, shape = dataclasses.replace(measure_weights(model), embedding_bytes=0), activation_shape(model)
    base = plan_vram(weights, shape, 1 << 40, chunk_tokens, step_tokens, slack_bytes=0)
    layer = max(base.layer_expert_bytes.values())
    budget = base.total_bytes - sum(base.layer_expert_bytes.values()) + (2 * group_layers + resident_layers) * layer
    return plan_vram(weights, shape, budget + 4096, chunk_tokens, step_tokens, group_layers, slack_bytes=0)


@pytest.mark.parametrize("quant", [None, "q4", "q8:g32"])
def test_streamed_prefill_equals_the_plain_forward(quant):
    model = random_model(CONFIG, torch.float32, quant)
    plan = streaming_plan(model, chunk_tokens=64, resident_layers=1)
    assert plan.streams and plan.resident_expert_layers  # some resident, some streamed
    runner = build_prefill_runner(model, "cpu", plan=plan)
    assert torch.equal(runner.prefill_prompt(PROMPT), cpu_prefill(model, PROMPT))


@pytest.mark.parametrize("group_layers", [1, 2])
def test_chunked_streamed_prefill_equals_resident(group_layers):
    model = random_model(CONFIG, torch.float32, "q8:g32")
    resident = build_prefill_runner(model, "cpu", chunk_tokens=8, step_tokens=64)
    streamed = build_prefill_runner(model, "cpu", plan=streaming_plan(model, 8, group_layers=group_layers))
    assert not resident.plan.streams and streamed.plan.streams
    assert torch.equal(streamed.prefill_prompt(PROMPT), resident.prefill_prompt(PROMPT))
    whole = cpu_prefill(model, PROMPT)  # one chunk: same math, other GEMM sizes
    torch.testing.assert_close(streamed.prefill_prompt(PROMPT), whole, rtol=1e-4, atol=1e-4)


def test_embedding_and_lm_head_left_on_the_host_give_the_same_logits():
    model = random_model(CONFIG, torch.float32, "q4")
    plan = dataclasses.replace(streaming_plan(model, 64), host_embedding=True, host_lm_head=True)
    runner = build_prefill_runner(model, "cpu", plan=plan)
    assert runner.model.lm_head.host is model.lm_head and runner.model.model.embed_tokens is model.model.embed_tokens
    hidden = runner.prefill_prompt(PROMPT)
    assert torch.equal(runner.model.compute_logits(hidden), model.compute_logits(cpu_prefill(model, PROMPT)))


def test_streaming_leaves_the_host_model_untouched():
    model = random_model(CONFIG, torch.float32, "q4")
    before = cpu_prefill(model, PROMPT)
    build_prefill_runner(model, "cpu", plan=streaming_plan(model, 16)).prefill_prompt(PROMPT)
    assert torch.equal(cpu_prefill(model, PROMPT), before)


@pytest.mark.parametrize("quant", [None, "q4:g32", "q8:g32"])
def test_grouped_experts_equal_the_reference_loop(quant):
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 8, 64, 32, 40, 3
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / 8
    down = torch.randn(experts, hidden, inter, generator=gen) / 6
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    ids[ids == 5] = 6  # one expert never hit
    weights = torch.rand(tokens, k, generator=gen)
    if quant is not None:
        spec = QuantSpec.parse(quant)
        gate_up, down = quantize(gate_up, spec), quantize(down, spec)
        expected = reference_experts(x, dequantize(gate_up), dequantize(down), ids, weights)
    else:
        expected = reference_experts(x, gate_up, down, ids, weights)
    torch.testing.assert_close(grouped_experts(x, gate_up, down, ids, weights), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fragmented", [False, True], ids=["runs", "gathered"])
def test_kv_hand_off_moves_every_layer_and_finished_state_rows_to_the_pool(fragmented, monkeypatch):
    if fragmented:  # every run over the limit: the gather + pinned block path
        monkeypatch.setattr(kv_handoff, "MAX_DIRECT_RUNS", 1)
    staging = KVCache.allocate([6, 4], 4, 4, torch.float32, "cpu", state_widths=[0, 5], num_state_slots=2)
    pool = KVCache.allocate([6, 4], 8, 4, torch.float32, "cpu", state_widths=[0, 5], num_state_slots=3)
    for t in [*staging.layers, staging.states[1]]:
        t.copy_(torch.randn(t.shape))
    staging_slots, pool_slots = torch.tensor([0, 1, 2, 9]), torch.tensor([28, 29, 30, 5])
    assert kv_handoff.contiguous_runs(staging_slots, pool_slots) == [(0, 28, 3), (9, 5, 1)]
    hand_off = KVHandOff(staging, pool)
    hand_off.begin(staging_slots, pool_slots, state_rows=[(1, 2)])
    hand_off.copy_all()
    for s, p in zip(staging.layers, pool.layers):
        assert torch.equal(p[pool_slots], s[staging_slots])
        assert p.count_nonzero() == s[staging_slots].count_nonzero()
    assert torch.equal(pool.states[1][2], staging.states[1][1]) and pool.states[1][:2].count_nonzero() == 0


def prefill_cores(model, plan, pages=16, state_widths=None, **route):
    """(plain core, streamed core) over pools of their own; the streamed one stages KV one layer at a time."""
    def pool():
        return KVCache.allocate(model.kv_widths, pages, 16, torch.float32, "cpu", state_widths, num_state_slots=3)

    plain = GpuPrefillCore(model, pool(), frozenset(), model.config.vocab_size, plan.step_tokens)
    runner = build_prefill_runner(model, "cpu", plan=plan)
    streamed = GpuPrefillCore(runner.model, pool(), frozenset(), model.config.vocab_size, plan.step_tokens,
                              staging_pages=pages, runner=runner, **route)  # fmt: skip
    assert streamed.staging is not None and streamed.staging.per_layer
    return plain, streamed


def request(rid, ids, pages, state_slot=None):
    """An AddRequest's fields (state_slot: until protocol_pipeline's AddRequest carries it)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    return SimpleNamespace(request_id=rid, prompt_ids=ids, sampling=params, page_table=pages, state_slot=state_slot)


def first_tokens(core, requests) -> dict:
    for r in requests:
        core.add(r)
    tokens = {}
    while core.has_work:
        tokens |= {t.request_id: t.token_id for t in core.step()[0]}
    return tokens


def test_streamed_core_writes_the_pool_kv_of_the_plain_core_bit_for_bit():
    model = random_model(CONFIG, torch.float32, "q8:g32")
    plain, streamed = prefill_cores(model, streaming_plan(model, chunk_tokens=64))  # one chunk: the same GEMMs
    # two prompts in one step: one on consecutive pool pages (one copy a layer), one on scattered pages
    requests = [request("a", PROMPT, [4, 5, 6]), request("b", PROMPT[:17], [15, 9])]
    assert first_tokens(streamed, requests) == first_tokens(plain, requests)
    for expected, got in zip(plain.kv.layers, streamed.kv.layers):
        assert torch.equal(got, expected)
    assert streamed.staging.pages.num_free == 16


def test_core_with_a_cpu_route_gives_short_prompts_to_the_cpu_and_matches_the_plain_core():
    model = random_model(CONFIG, torch.float32, "q4")
    plan = streaming_plan(model, chunk_tokens=64)
    rates = PrefillRates(link_bytes_per_s=plan.streamed_bytes / 0.01, gpu_tokens_per_s=1e6, cpu_tokens_per_s=1000)
    route = CpuPrefillRoute(model, rates, plan.streamed_bytes)  # the CPU wins below 10 tokens
    assert route.use_cpu(3) and not route.use_cpu(45)
    plain, streamed = prefill_cores(model, plan, cpu_route=route)
    for batch in ([request("long", PROMPT, [0, 1, 2])], [request("short", PROMPT[:3], [7])]):
        assert first_tokens(streamed, batch) == first_tokens(plain, batch)
    for expected, got in zip(plain.kv.layers, streamed.kv.layers):
        assert torch.equal(got, expected)


def test_streamed_core_hands_state_rows_to_the_pool_as_engine_core_computes_them():
    # Gated DeltaNet layers (state, no KV), full attention, a dense layer (no experts) and MoE layers
    model = random_model(TINY_QWEN3_NEXT, torch.float32, "q8:g32")
    engine = EngineCore(model, EngineConfig(max_context=256, kv_pages=8, max_batch_tokens=64, state_slots=2),
                        frozenset(), model.config.vocab_size)  # fmt: skip
    engine.add("a", PROMPT, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    expected_token = engine.step()[0].token_id
    engine_slot = engine.running[0].state_slot
    _, streamed = prefill_cores(model, streaming_plan(model, chunk_tokens=64), state_widths=model.state_widths)
    assert first_tokens(streamed, [request("a", PROMPT, [3, 4, 5], state_slot=2)]) == {"a": expected_token}
    with_state = [i for i, w in enumerate(model.state_widths) if w]
    assert with_state and len(with_state) < len(model.state_widths)
    for i in with_state:
        assert torch.equal(streamed.kv.states[i][2], engine.kv.states[i][engine_slot])
        assert streamed.kv.states[i][:2].count_nonzero() == 0
    for i, width in enumerate(model.kv_widths):
        if width:
            slots = engine.kv.slots(engine.running[0].page_table, 0, len(PROMPT))
            assert torch.equal(streamed.kv.read(i, streamed.kv.slots([3, 4, 5], 0, len(PROMPT))), engine.kv.read(i, slots))


def test_planned_weights_are_the_device_model_s_bytes_with_quantized_shared_experts(tmp_path):
    """measure_weights counts each weight once: a quantized shared expert (QuantLinear, dequantized on the device)
    was counted by its layer and again with the rest of the model, 0.84 GiB too much on all of V2-Lite."""
    raw, plan = presets.preset_config("tiny"), QuantPlan.parse("q4", "q8:g32")  # q8 dense: QuantLinears everywhere
    model_dir = bench_model_dir("tiny", raw, seed=3, root=tmp_path / "models")
    ensure_random_cache(model_dir, plan, tmp_path / "quant")
    model = load_model(model_dir, dtype=torch.bfloat16, quant=plan, cache_root=tmp_path / "quant")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    device_model, experts = build_device_model(model, "cpu")
    on_device = sum(t.nbytes for t in [*device_model.parameters(), *device_model.buffers()])
    weights = measure_weights(model)
    assert weights.total_bytes - sum(layer.expert_bytes for layer in weights.layers) == on_device


def test_layers_quantized_linears_stay_as_stored_and_compute_as_dequantized(tmp_path):
    """A decoder layer's quantized linears stay q4/q8 on the device and are dequantized into a scratch region when
    called, reused by the step's later chunks: the same bits as bf16 copies, chunk after chunk and step after step."""
    raw, plan = presets.preset_config("tiny"), QuantPlan.parse("q4", "q8:g32")  # quantized attention and shared experts
    model_dir = bench_model_dir("tiny", raw, seed=3, root=tmp_path / "models")
    ensure_random_cache(model_dir, plan, tmp_path / "quant")
    model = load_model(model_dir, dtype=torch.bfloat16, quant=plan, cache_root=tmp_path / "quant")
    runner = build_prefill_runner(model, "cpu", chunk_tokens=16, step_tokens=64)
    stored = [m for m in runner.model.modules() if isinstance(m, DeviceQuantLinear)]
    assert len(stored) >= 2 * raw["num_hidden_layers"]  # regions shared across layers, reused across chunks
    prompts = [PROMPT, PROMPT[::-1]]
    outputs = [runner.prefill_prompt(p) for p in prompts]
    for linear in stored:  # the same model with bf16 copies of the weights
        parent, _, child = next(n for n, m in runner.model.named_modules() if m is linear).rpartition(".")
        plain = nn.Linear(*reversed(linear.weight_q.shape), bias=linear.bias is not None, dtype=torch.bfloat16)
        plain.weight.data, plain.bias = dequantize(linear.weight_q, torch.bfloat16), linear.bias
        setattr(runner.model.get_submodule(parent), child, plain)
    for prompt, output in zip(prompts, outputs):
        assert torch.equal(runner.prefill_prompt(prompt), output)


@pytest.mark.parametrize("config, plain", [(CONFIG, True), (TINY_QWEN3_NEXT, False)])
def test_the_plan_counts_norm_copies_unless_every_norm_runs_fused(config, plain):
    model = random_model(config, torch.bfloat16, None)
    assert activation_shape(model, fused_norms=False).norm_fp32_copies  # torch's norms copy to fp32
    assert activation_shape(model, fused_norms=True).norm_fp32_copies != plain  # Qwen3-Next's gated norms still do
