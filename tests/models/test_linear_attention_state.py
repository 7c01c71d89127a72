"""Gated DeltaNet models (qwen3_next, qwen3_5_moe): the per-sequence state carries over exactly across DeltaNet
chunks (64 tokens), engine steps and decode, and a reused state slot starts clean."""

import pytest
import torch

from krasis.common.engine import EngineConfig, EngineCore
from tests.models.harness import SingleSequence, reference_logits, relative_error, teacher_forced_logits
from tests.models.test_exactness import TOLERANCE, prompt
from tests.models.test_generation import GREEDY_32, reference_greedy, run
from tests.models.tiny_checkpoints import QWEN3_5_MOE, QWEN3_NEXT

HYBRID = sorted({**QWEN3_NEXT, **QWEN3_5_MOE})


@pytest.fixture(params=HYBRID)
def variant(request):
    return request.param


def small_step_engine(model, max_batch_tokens: int, state_slots: int = 64) -> EngineCore:
    config = EngineConfig(
        max_context=model.config.max_position_embeddings, kv_pages=64, page_size=16,
        max_batch_tokens=max_batch_tokens, state_slots=state_slots,
    )  # fmt: skip
    return EngineCore(model, config, frozenset(), model.config.vocab_size)


def test_prompt_of_several_deltanet_chunks_matches_transformers(ours, reference, variant):
    tokens = prompt(150, ours.config.vocab_size, seed=7)  # 64 + 64 + 22
    err = relative_error(teacher_forced_logits(ours, tokens), reference_logits(reference, tokens))
    assert err <= TOLERANCE, f"{variant}: relative logit error {err:.2e} over 150 tokens"


def test_prefill_in_pieces_across_chunk_boundaries_equals_one_pass(ours, variant):
    tokens = prompt(160, ours.config.vocab_size, seed=8)
    full = teacher_forced_logits(ours, tokens)
    seq = SingleSequence(ours, len(tokens))
    cuts = [0, 50, 70, 71, 135, 136, 137, 160]  # pieces straddling chunk ends, single tokens (decode) between
    pieces = [seq.feed(tokens[a:b]) for a, b in zip(cuts, cuts[1:])]
    err = relative_error(torch.cat(pieces), full)
    assert err <= TOLERANCE, f"{variant}: piecewise prefill differs from one pass by {err:.2e}"


def test_prefill_split_over_engine_steps_matches_transformers_generate(ours, reference, variant):
    ids = prompt(90, ours.config.vocab_size, seed=9)
    expected = reference_greedy(reference, ids, 32, eos=None)
    core = small_step_engine(ours, max_batch_tokens=24)  # the prompt takes 4 steps
    assert run(core, {"a": ids}, GREEDY_32)["a"] == expected


def test_sequences_sharing_one_state_slot_in_turn_equal_each_alone(ours, variant):
    prompts = {f"p{n}": prompt(n, ours.config.vocab_size, seed=n) for n in (70, 9)}
    alone = {rid: run(small_step_engine(ours, 2048), {rid: ids}, GREEDY_32)[rid] for rid, ids in prompts.items()}
    core = small_step_engine(ours, 32, state_slots=1)  # the second waits for the first's slot, then reuses it
    assert run(core, prompts, GREEDY_32) == alone
    assert core.state_allocator.num_free == 1, "a finished sequence must free its state slot"


def test_abort_frees_the_state_slot(ours):
    core = small_step_engine(ours, 16, state_slots=1)
    core.add("a", prompt(40, ours.config.vocab_size), GREEDY_32)
    core.step()
    assert core.state_allocator.num_free == 0
    core.abort("a")
    assert core.state_allocator.num_free == 1 and not core.has_work


def test_state_widths_cover_only_deltanet_layers(ours):
    types = ours.config.layer_types
    assert [w > 0 for w in ours.state_widths] == [t == "linear_attention" for t in types]
    assert [w > 0 for w in ours.kv_widths] == [t == "full_attention" for t in types]
