"""The VRAM planner and the prefill cost model: pure arithmetic, no GPU."""

import dataclasses
import math

import pytest

from krasis.gpu_worker.prefill_cost import PrefillRates, cpu_prefill_seconds, crossover_tokens, gpu_prefill_seconds, prefers_cpu
from krasis.gpu_worker.vram_plan import ActivationShape, LayerWeights, ModelWeights, VramBudgetError, plan_vram

MiB = 1 << 20
SHAPE = ActivationShape(hidden_size=2048, top_k=6, expert_width=1408, num_heads=16, attn_bytes_per_context_token=20480,
                        layer_kv_bytes_per_token=576 * 2, num_experts=64)  # fmt: skip


def weights(layers=8, expert=300 * MiB, resident=30 * MiB, other=800 * MiB) -> ModelWeights:
    dense = LayerWeights(0, 130 * MiB, 0)
    return ModelWeights(other, (dense, *(LayerWeights(i, resident, expert) for i in range(1, layers))))


def plan(budget_mib, **kw):
    return plan_vram(weights(), SHAPE, budget_mib * MiB, chunk_tokens=4096, step_tokens=8192, slack_bytes=0, **kw)


def test_everything_resident_when_it_fits():
    p = plan(100_000)
    assert not p.streams and p.num_buffers == 0 and p.streamed_bytes == 0
    assert p.resident_expert_layers == tuple(range(1, 8))
    assert "nothing streams" in p.describe()


@pytest.mark.parametrize("budget_mib", [2800, 3000, 3100, 3400, 3700])
def test_plan_never_exceeds_budget_and_streams_the_rest(budget_mib):
    p = plan(budget_mib)
    assert p.streams
    assert p.total_bytes <= budget_mib * MiB
    streamed = [i for g in p.groups for i in g]
    assert sorted(streamed + list(p.resident_expert_layers)) == list(range(1, 8))
    assert p.streamed_bytes == len(streamed) * 300 * MiB
    if streamed:  # earliest layers resident, the streamed ones after them
        assert min(streamed) > max(p.resident_expert_layers, default=0)
        assert p.num_buffers == min(2, len(p.groups)) and p.buffer_bytes >= 300 * MiB


def test_more_budget_never_streams_more():
    streamed = [plan(b).streamed_bytes for b in range(3400, 5200, 100)]
    assert streamed == sorted(streamed, reverse=True)


def test_groups_of_several_layers():
    p = plan(3500, group_layers=3)
    assert p.streams and all(len(g) <= 3 for g in p.groups) and p.buffer_bytes >= 3 * 300 * MiB


def test_too_small_budget_is_a_clear_error():
    with pytest.raises(VramBudgetError, match="too small.*raise --vram-budget"):
        plan(1800)


def test_a_tight_budget_halves_the_chunk_before_giving_up():
    p = plan(2100)
    assert p.streams and p.chunk_tokens < 4096 and p.total_bytes <= 2100 * MiB
    assert plan(4000).chunk_tokens == 4096  # the asked chunk whenever any plan fits with it


def test_the_input_embedding_leaves_the_device_before_the_chunk_shrinks():
    untied = ModelWeights(1200 * MiB, weights().layers, embedding_bytes=400 * MiB)
    assert not plan_vram(untied, SHAPE, 100_000 * MiB, 4096, 8192, slack_bytes=0).host_embedding  # all resident
    tight = plan_vram(untied, SHAPE, 2500 * MiB, 4096, 8192, slack_bytes=0)
    assert tight.host_embedding and tight.chunk_tokens == 4096 and tight.total_bytes <= 2500 * MiB
    assert "input embedding on the host" in tight.describe()


@pytest.mark.parametrize("expert_mib", [300, 500])
def test_the_input_embedding_leaves_the_device_when_that_keeps_more_experts_resident(expert_mib):
    layers = weights(expert=expert_mib * MiB).layers
    untied = ModelWeights(1200 * MiB, layers, embedding_bytes=400 * MiB)
    pinned = ModelWeights(1200 * MiB, layers)  # the same bytes, the embedding bound to the device
    moved = []  # budgets where the full chunk fits either way and the embedding left for more resident experts
    for budget in range(3000, 5000, 100):
        device = plan_vram(pinned, SHAPE, budget * MiB, 4096, 8192, slack_bytes=0)
        chosen = plan_vram(untied, SHAPE, budget * MiB, 4096, 8192, slack_bytes=0)
        assert chosen.streamed_bytes <= device.streamed_bytes and chosen.total_bytes <= budget * MiB
        if device.chunk_tokens < 4096:  # the chunk would shrink: the embedding leaves anyway (the test above)
            assert chosen.host_embedding and chosen.chunk_tokens == 4096
            continue
        assert chosen.host_embedding == (chosen.streamed_bytes < device.streamed_bytes)
        moved += [budget] if chosen.host_embedding else []
    assert moved  # the rule was exercised


def test_state_rows_are_planned_for_models_with_state():
    stateful = dataclasses.replace(SHAPE, state_bytes_per_seq=80 * MiB)
    base = plan_vram(weights(), SHAPE, 1 << 40, 4096, 8192, slack_bytes=0, state_slots=4)
    with_state = plan_vram(weights(), stateful, 1 << 40, 4096, 8192, slack_bytes=0, state_slots=4)
    assert base.state_slots == 0 and with_state.state_slots == 4
    assert with_state.activation_bytes - base.activation_bytes == 4 * 80 * MiB


def test_kv_staging_is_one_layer_not_the_whole_model():
    """A 32K-token step stages two layers' KV (and a gather block), whatever the depth of the model."""
    step = SHAPE.step_bytes(32768, 2048, 0)
    assert step < 32768 * (2048 * 2 + 4 * 576 * 2) + (16 << 20)


def test_activations_grow_with_chunk_and_step():
    small = plan_vram(weights(), SHAPE, 1 << 40, 1024, 2048, slack_bytes=0).activation_bytes
    large = plan_vram(weights(), SHAPE, 1 << 40, 8192, 32768, slack_bytes=0).activation_bytes
    assert large > 4 * small


def test_blockwise_attention_keeps_a_chunk_flat_as_its_context_grows():
    """MLA on cuDNN expands one block of the context at a time: a chunk's transients then grow with the context only by
    the cached rows read back (the whole context), not by its expanded keys and values."""
    blockwise = dataclasses.replace(SHAPE, attention_block=4096)
    whole_growth = SHAPE.chunk_bytes(1024, 32768) - SHAPE.chunk_bytes(1024, 8192)
    block_growth = blockwise.chunk_bytes(1024, 32768) - blockwise.chunk_bytes(1024, 8192)
    assert whole_growth == (32768 - 8192) * SHAPE.attn_bytes_per_context_token
    assert block_growth == (32768 - 8192) * SHAPE.layer_kv_bytes_per_token
    # a short context: the same expansion, plus the cached rows counted once more (conservative)
    assert blockwise.chunk_bytes(1024, 2048) == SHAPE.chunk_bytes(1024, 2048) + 2048 * SHAPE.layer_kv_bytes_per_token
    # a 32K step that does not fit with the whole context expanded fits with the largest chunk
    with pytest.raises(VramBudgetError):
        plan_vram(weights(), SHAPE, 2600 * MiB, 4096, 32768, slack_bytes=0)
    assert plan_vram(weights(), blockwise, 2600 * MiB, 4096, 32768, slack_bytes=0).chunk_tokens == 4096


RATES = PrefillRates(link_bytes_per_s=50e9, gpu_tokens_per_s=40_000, cpu_tokens_per_s=400)


def test_short_prompts_go_to_the_cpu_long_ones_to_the_gpu():
    streamed = 8 * 10**9  # 0.16 s over the link
    threshold = crossover_tokens(streamed, RATES)
    assert threshold == pytest.approx(0.16 * 400, abs=1)
    assert prefers_cpu(threshold - 1, streamed, RATES) and not prefers_cpu(threshold, streamed, RATES)
    assert gpu_prefill_seconds(threshold, streamed, RATES) <= cpu_prefill_seconds(threshold, RATES)


def test_threshold_follows_the_measured_rates():
    fast_link = PrefillRates(200e9, 40_000, 400)
    fast_cpu = PrefillRates(50e9, 40_000, 2000)
    base = crossover_tokens(8e9, RATES)
    assert crossover_tokens(8e9, fast_link) < base < crossover_tokens(8e9, fast_cpu)
    assert crossover_tokens(0, RATES) == 1  # nothing streams: the GPU always wins
    assert crossover_tokens(8e9, PrefillRates(50e9, 400, 500)) == math.inf


def test_rates_must_be_positive():
    with pytest.raises(ValueError, match="cpu_tokens_per_s"):
        PrefillRates(1e9, 1.0, 0.0)


def test_a_shorter_step_takes_larger_chunks_within_the_planned_activations():
    p = plan_vram(weights(), SHAPE, 3000 * MiB, 2048, 32768, slack_bytes=0)
    assert p.chunk_tokens <= 2048
    held = SHAPE.chunk_bytes(p.chunk_tokens, 32768) + 32768 * SHAPE.hidden_size * 2
    for tokens in (512, 4096, 8192, 32768):
        chunk = p.chunk_for(tokens)
        assert p.chunk_tokens <= chunk <= max(tokens, p.chunk_tokens)
        assert chunk == p.chunk_tokens or SHAPE.chunk_bytes(chunk, tokens) + tokens * SHAPE.hidden_size * 2 <= held
    assert p.chunk_for(8192) > p.chunk_tokens  # 8K of context leaves room for bigger chunks than 32K does
    assert p.chunk_for(32768) == p.chunk_tokens


def test_the_lm_head_leaves_the_device_after_the_embedding_and_before_the_chunk_shrinks():
    untied = ModelWeights(1200 * MiB, weights().layers, embedding_bytes=400 * MiB, lm_head_bytes=400 * MiB)
    both = plan_vram(untied, SHAPE, 2100 * MiB, 4096, 8192, slack_bytes=0)
    assert both.host_embedding and both.host_lm_head and both.chunk_tokens == 4096 and both.total_bytes <= 2100 * MiB
    assert "lm_head on the host" in both.describe()
    assert not plan_vram(untied, SHAPE, 2500 * MiB, 4096, 8192, slack_bytes=0).host_lm_head


def test_the_dequantizing_scratch_counts_for_large_chunks_and_goes_before_the_chunk_shrinks():
    scratch = dataclasses.replace(SHAPE, expert_scratch_bytes=240 * MiB, dequantize_first_rows=256)
    # 4096 tokens x top-6 over 64 experts: 384 rows an expert, dequantized first; 2048: 192 rows, in the GEMM tiles
    assert scratch.chunk_bytes(4096, 8192) > SHAPE.chunk_bytes(4096, 8192)
    assert scratch.chunk_bytes(2048, 8192) == SHAPE.chunk_bytes(2048, 8192)
    roomy = plan_vram(weights(), scratch, 4000 * MiB, 4096, 8192, slack_bytes=0)
    assert roomy.expert_scratch_bytes == 240 * MiB and "dequantized 240 MiB at a time" in roomy.describe()
    smallest = min(b for b in range(2000, 3000, 10) if plan(b).chunk_tokens == 4096)  # without any scratch
    tight = plan_vram(weights(), scratch, smallest * MiB, 4096, 8192, slack_bytes=0)
    assert tight.chunk_tokens == 4096 and tight.expert_scratch_bytes == 0 and tight.total_bytes <= smallest * MiB
    assert "dequantized" not in tight.describe()


def test_fused_norms_hold_no_fp32_copies_of_the_chunk():
    fused = dataclasses.replace(SHAPE, norm_fp32_copies=False)
    for chunk in (256, 4096, 16384):
        assert SHAPE.chunk_bytes(chunk, 32768) - fused.chunk_bytes(chunk, 32768) == chunk * SHAPE.hidden_size * 8
