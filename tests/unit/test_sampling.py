"""Sampling: transformers' processors are the reference; seeds make draws reproducible."""

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from krasis.common.sampling import SamplingParams, SequenceSampler, apply_penalties, sample
from krasis.common.sampling_warpers import apply_warpers

VOCAB = 64


def random_logits(rows: int, vocab: int = VOCAB, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def hf_warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What transformers' generate() does to the scores of a sampled row."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(float(p.temperature))])
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return procs(dummy_ids, logits.clone())


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor) -> None:
    kept = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), kept)
    assert torch.equal(ours[kept], ref[kept])


def samplers(params: list[SamplingParams], vocab: int = VOCAB, prompt=()) -> list[SequenceSampler]:
    return [SequenceSampler(p, prompt, vocab) for p in params]


WARPER_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.9),
    SamplingParams(temperature=0.6, top_p=0.5),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=1.5, min_p=0.3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=2.0, top_k=40, top_p=0.95),
]


def case_id(p: SamplingParams) -> str:
    return f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}"


@pytest.mark.parametrize("params", WARPER_CASES, ids=case_id)
def test_warpers_match_transformers(params):
    logits = random_logits(8, seed=1)
    assert_same_scores(apply_warpers(logits, [params] * 8), hf_warp(logits, params))


def test_warpers_apply_each_rows_own_params():
    logits = random_logits(len(WARPER_CASES), seed=2)
    ours = apply_warpers(logits, WARPER_CASES)
    for row, params in enumerate(WARPER_CASES):
        assert_same_scores(ours[row : row + 1], hf_warp(logits[row : row + 1], params))


@pytest.mark.parametrize("scale", [6.0, 0.3], ids=["nucleus-in-window", "nucleus-needs-full-sort"])
def test_top_p_on_large_vocab_matches_transformers(scale):
    logits = random_logits(3, vocab=8192, scale=scale, seed=3)
    params = SamplingParams(top_p=0.9)
    ours = apply_warpers(logits, [params] * 3)
    assert_same_scores(ours, hf_warp(logits, params))


def test_top_k_keeps_ties_with_the_kth_logit_like_transformers():
    logits = random_logits(2, scale=1.0, seed=12)
    logits[:, :4] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    logits[:, 10:13] = 5.0  # the 5th best logit, three times over
    params = SamplingParams(top_k=5, top_p=0.999)
    ours = apply_warpers(logits, [params] * 2)
    assert_same_scores(ours, hf_warp(logits, params))
    assert int(torch.isfinite(ours[0]).sum()) == 7


def test_top_p_counts_the_mass_of_every_top_k_tie():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 0] = 6.0
    logits[0, 1:6] = 5.0  # top_k=2 keeps all five: 6 alone holds 35% of the mass, not 58%
    ours = apply_warpers(logits, [SamplingParams(top_k=2, top_p=0.4)])
    assert torch.isfinite(ours[0]).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_top_p_keeps_tied_tokens_together():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, [3, 30]] = 4.0  # two equally likely tokens hold almost all the mass
    ours = apply_warpers(logits, [SamplingParams(top_p=0.2)])
    assert torch.isfinite(ours[0]).nonzero().flatten().tolist() == [3, 30]


def test_repetition_penalty_matches_transformers():
    params = SamplingParams(repetition_penalty=1.3)
    prompt, output = [3, 5, 5, 9], [11, 3, 40]
    seq = SequenceSampler(params, prompt, VOCAB, output_ids=output)
    logits = random_logits(1, seed=4)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    ours = apply_penalties(logits, [seq])
    assert torch.equal(ours, ref)
    changed = (ours != logits).nonzero()[:, 1].tolist()
    assert changed == sorted(set(prompt + output))


def test_presence_and_frequency_penalize_only_generated_tokens():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    seq = SequenceSampler(params, [1, 2, 7], VOCAB, output_ids=[7, 7, 9])
    logits = random_logits(1, seed=5)
    ours = apply_penalties(logits, [seq])
    expected = logits.clone()
    expected[0, 7] -= 0.5 + 2 * 0.25
    expected[0, 9] -= 0.5 + 1 * 0.25
    assert torch.allclose(ours, expected, rtol=0, atol=1e-6)
    assert (ours != logits).nonzero()[:, 1].tolist() == [7, 9]


def test_penalties_touch_only_their_rows_and_not_the_input():
    penalized = SequenceSampler(SamplingParams(repetition_penalty=2.0), [4], VOCAB)
    plain = SequenceSampler(SamplingParams(), [4], VOCAB)
    logits = random_logits(2, seed=6)
    before = logits.clone()
    ours = apply_penalties(logits, [plain, penalized])
    assert torch.equal(logits, before)
    assert torch.equal(ours[0], logits[0])
    assert (ours[1] != logits[1]).nonzero().flatten().tolist() == [4]


def test_greedy_picks_argmax_of_penalized_logits():
    logits = random_logits(4, seed=7)
    top = logits.argmax(dim=-1)
    seqs = samplers([SamplingParams(temperature=0.0)] * 3)
    banned_top = SamplingParams(temperature=0.0, repetition_penalty=1e6)
    seqs.append(SequenceSampler(banned_top, [int(top[3])], VOCAB))
    tokens = sample(logits, seqs).token_ids
    assert tokens[:3] == top[:3].tolist()
    assert tokens[3] != int(top[3])
    assert tokens[3] == int(logits[3].clone().index_fill_(0, top[3], -math.inf).argmax())


def test_greedy_accepts_bf16_logits():
    logits = random_logits(3, seed=8).bfloat16()
    tokens = sample(logits, samplers([SamplingParams(temperature=0.0)] * 3)).token_ids
    assert tokens == logits.float().argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy():
    logits = random_logits(16, seed=9)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(16)]
    assert sample(logits, samplers(params)).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
                                    SamplingParams(temperature=0.1, top_p=0.3, min_p=0.9)])
def test_filters_never_remove_argmax(params):
    logits = random_logits(32, scale=0.5, seed=10)
    warped = apply_warpers(logits, [params] * 32)
    top = logits.argmax(dim=-1, keepdim=True)
    assert torch.isfinite(warped.gather(1, top)).all()


def run_steps(logits_per_step, seqs: list[SequenceSampler], watched: int) -> list[int]:
    tokens = []
    for logits in logits_per_step:
        step = sample(logits, seqs).token_ids
        for seq, token in zip(seqs, step):
            seq.append(token)
        tokens.append(step[watched])
    return tokens


def test_seed_reproduces_tokens_whatever_the_batch():
    steps = 12
    mine = [random_logits(1, scale=1.0, seed=100 + s) for s in range(steps)]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = run_steps(mine, samplers([params]), watched=0)

    others = [SamplingParams(temperature=0.0), SamplingParams(seed=5, repetition_penalty=1.2)]
    batch = [torch.cat([random_logits(2, scale=1.0, seed=200 + s), m]) for s, m in enumerate(mine)]
    last = run_steps(batch, samplers(others + [params]), watched=2)
    first = run_steps([b.flip(0) for b in batch], samplers([params] + others[::-1]), watched=0)
    assert alone == last == first
    assert len(set(alone)) > 1  # really sampled, not stuck on one token


def test_different_seeds_give_different_tokens():
    logits = [random_logits(1, scale=0.5, seed=300 + s) for s in range(10)]
    a = run_steps(logits, samplers([SamplingParams(seed=1)]), watched=0)
    b = run_steps(logits, samplers([SamplingParams(seed=2)]), watched=0)
    assert a != b


def test_each_step_draws_fresh_randomness():
    flat = torch.zeros(1, VOCAB)
    tokens = run_steps([flat] * 20, samplers([SamplingParams(seed=9)]), watched=0)
    assert len(set(tokens)) > 10


def test_resumed_sampler_continues_the_same_tokens():
    logits = [random_logits(1, scale=0.5, seed=400 + s) for s in range(8)]
    params = SamplingParams(presence_penalty=0.4)  # unseeded: the sampler draws its own seed
    first = SequenceSampler(params, [1, 2], VOCAB)
    head = run_steps(logits[:3], [first], watched=0)
    handed_over = dataclasses.replace(params, seed=first.seed)
    resumed = SequenceSampler(handed_over, [1, 2], VOCAB, output_ids=head)
    tail = run_steps(logits[3:], [resumed], watched=0)
    uninterrupted = run_steps(logits, [SequenceSampler(handed_over, [1, 2], VOCAB)], watched=0)
    assert head + tail == uninterrupted


def token_counts(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    seeded = [dataclasses.replace(params, seed=i) for i in range(draws)]
    seqs = samplers(seeded, vocab=logits_row.numel())
    tokens = sample(logits_row.expand(draws, -1), seqs).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    support = expected > 0
    assert observed[~support].sum() == 0, "drew a token of zero probability"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


# chi-square critical values at p = 1e-4; the draws are seeded, so the test is deterministic.
CHI2_CRITICAL = {3: 21.1, 5: 25.7, 6: 27.9}


def test_sampling_at_temperature_one_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    observed = token_counts(logits, SamplingParams(), draws=4000)
    assert chi_square(observed, logits.softmax(-1)) < CHI2_CRITICAL[5]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, 0.0, -1.0, -2.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    observed = token_counts(logits, params, draws=4000)
    probs = hf_warp(logits.unsqueeze(0), params).softmax(-1)[0]
    assert int((probs > 0).sum()) == 4
    assert chi_square(observed, probs) < CHI2_CRITICAL[3]


def test_sampling_follows_softmax_across_draw_blocks():
    logits = torch.full((600,), -40.0)  # 600 = two full blocks of 256 and a padded one
    hot = [0, 255, 256, 300, 511, 512, 599]
    logits[hot] = torch.tensor([1.0, 0.5, 0.0, 1.5, -0.5, 0.2, 1.0])
    observed = token_counts(logits, SamplingParams(), draws=4000)
    assert chi_square(observed, logits.softmax(-1)) < CHI2_CRITICAL[6]


@pytest.mark.parametrize("u, expected", [(0.0, 300), (1.0 - 2.0**-53, 540)])
def test_extreme_uniforms_pick_the_first_and_last_kept_token(monkeypatch, u, expected):
    monkeypatch.setattr(SequenceSampler, "next_uniform", lambda self: u)
    logits = torch.full((2, 600), -math.inf)
    logits[0, [300, 540]] = 0.0  # the first draw block holds nothing
    logits[1, :100] = 1.0
    logits[1, [300, 540]] = torch.tensor([2.0, 1.9])  # top_k=2 keeps these, best first
    seqs = samplers([SamplingParams(), SamplingParams(top_k=2)], vocab=600)
    assert sample(logits, seqs).token_ids == [expected, expected]


def test_logprobs_come_from_raw_logits():
    logits = random_logits(3, seed=11)
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=3, seed=1),
        SamplingParams(),
        SamplingParams(temperature=0.0, logprobs=0),
    ]
    result = sample(logits, samplers(params, prompt=[0, 1, 2]))
    reference = logits.log_softmax(dim=-1)
    assert result.logprobs[1] is None
    for row in (0, 2):
        got = result.logprobs[row]
        assert got.logprob == pytest.approx(float(reference[row, result.token_ids[row]]), abs=1e-6)
        top = reference[row].topk(params[row].logprobs)
        assert got.top_ids == top.indices.tolist()
        assert got.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)


BAD_FIELDS = [
    ("max_tokens", -1),
    ("max_tokens", 0),
    ("max_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", VOCAB + 1),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", math.inf),
    ("seed", 1.5),
    ("seed", True),
    ("stop", ("",)),
    ("stop", tuple(f"s{i}" for i in range(17))),
    ("stop", "halt"),
    ("ignore_eos", 1),
    ("logprobs", -1),
    ("logprobs", 21),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_FIELDS])
def test_validate_rejects_bad_field(field, value):
    params = dataclasses.replace(SamplingParams(), **{field: value})
    with pytest.raises(ValueError, match=rf"^{field}: "):
        params.validate(vocab_size=VOCAB)


def test_validate_accepts_edge_values():
    SamplingParams().validate(VOCAB)
    edges = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0,
                           presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.5,
                           seed=-7, stop=("\n\n",), logprobs=20)
    edges.validate(VOCAB)
    assert edges.greedy and not SamplingParams().greedy


def test_sequence_sampler_rejects_out_of_vocab_ids():
    with pytest.raises(ValueError, match="prompt ids"):
        SequenceSampler(SamplingParams(repetition_penalty=1.1), [0, VOCAB], VOCAB)
    seq = SequenceSampler(SamplingParams(), [], VOCAB)
    with pytest.raises(ValueError, match="outside vocab"):
        seq.append(VOCAB)


def test_sample_rejects_logits_of_the_wrong_shape():
    seqs = samplers([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="logits must be"):
        sample(random_logits(3), seqs)
    with pytest.raises(ValueError, match="columns"):
        sample(random_logits(2, vocab=VOCAB + 1), seqs)
