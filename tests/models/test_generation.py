"""Greedy generation through the engine equals transformers' generate; batching changes nothing."""

import torch

from krasis.common.engine import EngineConfig, EngineCore
from krasis.common.protocol import FinishReason
from krasis.common.sampling import SamplingParams
from tests.models.test_exactness import prompt

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0)


def engine(model, eos: frozenset[int] = frozenset(), kv_pages: int = 64) -> EngineCore:
    config = EngineConfig(max_context=model.config.max_position_embeddings, kv_pages=kv_pages, page_size=16)
    return EngineCore(model, config, eos, model.config.vocab_size)


def run(core: EngineCore, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    out = {rid: [] for rid in prompts}
    finish = {}
    for rid, ids in prompts.items():
        core.add(rid, ids, params)
    while core.has_work:
        for event in core.step():
            if event.token_id is not None:
                out[event.request_id].append(event.token_id)
            if event.finish_reason is not None:
                finish[event.request_id] = event.finish_reason
    assert set(finish) == set(prompts), "every request must end with a finish reason"
    return out


def reference_greedy(reference, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0, attention_mask=torch.ones(1, len(ids)),
        )
    generated = out[0, len(ids):].tolist()
    return generated[:-1] if eos is not None and generated and generated[-1] == eos else generated


def test_greedy_32_tokens_match_transformers_generate(ours, reference, variant):
    ids = prompt(20, ours.config.vocab_size, seed=2)
    expected = reference_greedy(reference, ids, 32, eos=None)
    got = run(engine(ours), {"a": ids}, GREEDY_32)["a"]
    assert got == expected, f"{variant}: greedy tokens diverge from transformers"
    assert len(got) == 32


def test_batch_of_different_lengths_equals_each_alone(ours, variant):
    prompts = {f"p{n}": prompt(n, ours.config.vocab_size, seed=n) for n in (3, 17, 41)}
    alone = {rid: run(engine(ours), {rid: ids}, GREEDY_32)[rid] for rid, ids in prompts.items()}
    together = run(engine(ours), prompts, GREEDY_32)
    assert together == alone, f"{variant}: batching changed greedy tokens"


def test_eos_ends_generation_without_emitting_it(ours):
    ids = prompt(10, ours.config.vocab_size, seed=3)
    free = run(engine(ours), {"a": ids}, GREEDY_32)["a"]
    cut = next(i for i, token in enumerate(free) if i > 0 and token not in free[:i])
    core = engine(ours, eos=frozenset({free[cut]}))  # the first new token at `cut` now ends the sequence
    core.add("a", ids, GREEDY_32)
    events = []
    while core.has_work:
        events += core.step()
    assert [e.token_id for e in events[:-1]] == free[:cut]
    assert events[-1].token_id is None and events[-1].finish_reason == FinishReason.STOP


def test_max_tokens_ends_with_length(ours):
    core = engine(ours)
    core.add("a", prompt(5, ours.config.vocab_size), SamplingParams(max_tokens=3, temperature=0.0))
    events = []
    while core.has_work:
        events += core.step()
    assert len(events) == 3 and events[-1].finish_reason == FinishReason.LENGTH
    assert core.allocator.num_free == core.kv.num_pages, "finished sequences must free their KV pages"
