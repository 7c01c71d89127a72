"""Token sampling: per-sequence state, the penalties, and one batched sampling step.

Order of operations matches transformers' generate(): repetition penalty, presence/frequency
penalty, then greedy argmax or temperature -> top-k -> top-p -> min-p -> draw (sampling_warpers.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from krasis.common.sampling_params import SamplingParams  # noqa: F401  (re-exported)
from krasis.common.sampling_warpers import draw

_U64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


class _TokenTally:
    """Distinct token ids with their counts, kept as tensors ready for index ops."""

    def __init__(self, ids: torch.Tensor):
        unique, counts = torch.unique(ids, return_counts=True)
        n = unique.numel()
        self._ids = torch.zeros(max(64, 2 * n), dtype=torch.long)
        self._counts = torch.zeros(max(64, 2 * n), dtype=torch.float32)
        self._ids[:n] = unique
        self._counts[:n] = counts.float()
        self._pos = dict(zip(unique.tolist(), range(n)))

    def add(self, token_id: int) -> None:
        pos = self._pos.setdefault(token_id, len(self._pos))
        if pos == self._ids.numel():
            self._ids = torch.cat([self._ids, torch.zeros_like(self._ids)])
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
        self._ids[pos] = token_id
        self._counts[pos] += 1

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: len(self._pos)]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[: len(self._pos)]


class SequenceSampler:
    """Per-sequence sampling state: penalty bookkeeping and the sequence's own generator.

    The draw for output token n comes from the generator reseeded with hash(seed, n), so the
    state needed to continue a sequence elsewhere is just (params with `seed=self.seed`,
    prompt ids, output ids): rebuild with `SequenceSampler(params, prompt, V, output_ids)`.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        output_ids: Sequence[int] = (),
    ):
        self.params = params
        self.vocab_size = vocab_size
        fresh = int.from_bytes(os.urandom(8), "little")
        self.seed = params.seed if params.seed is not None else fresh
        self.num_generated = 0
        self.generator = torch.Generator()
        # seen: prompt + output ids (repetition penalty); generated: output ids only.
        self.seen: _TokenTally | None = None
        self.generated: _TokenTally | None = None
        if params.repetition_penalty != 1.0:
            prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
            if prompt.numel() and not (0 <= int(prompt.min()) <= int(prompt.max()) < vocab_size):
                raise ValueError(f"prompt ids must be in [0, {vocab_size})")
            self.seen = _TokenTally(prompt)
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.generated = _TokenTally(torch.empty(0, dtype=torch.long))
        for token_id in output_ids:
            self.append(token_id)

    def append(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside vocab of {self.vocab_size}")
        for tally in (self.seen, self.generated):
            if tally is not None:
                tally.add(token_id)
        self.num_generated += 1

    def next_uniform(self) -> float:
        """U[0, 1) for the next output token; the same value until append() moves on."""
        step_seed = _splitmix64((self.seed & _U64) ^ _splitmix64(self.num_generated))
        self.generator.manual_seed(step_seed)
        return torch.rand(1, dtype=torch.float64, generator=self.generator).item()


@dataclass
class TokenLogprobs:
    """Log-probabilities of one step from the raw model logits (OpenAI/vLLM default)."""

    logprob: float  # of the chosen token
    top_ids: list[int]  # best first, len == params.logprobs
    top_logprobs: list[float]


@dataclass
class SampleResult:
    token_ids: list[int]  # [B]
    logprobs: list[TokenLogprobs | None]  # [B], None where the row did not ask


def sample(logits: torch.Tensor, seqs: list[SequenceSampler]) -> SampleResult:
    """Pick one token per row. logits: [B, V], any float dtype; work is done in fp32."""
    if logits.dim() != 2 or logits.shape[0] != len(seqs):
        raise ValueError(f"logits must be [{len(seqs)}, V], got {list(logits.shape)}")
    if any(s.vocab_size != logits.shape[1] for s in seqs):
        sizes = sorted({s.vocab_size for s in seqs})
        raise ValueError(f"logits have {logits.shape[1]} columns, samplers expect {sizes}")
    raw = logits.float()
    x = apply_penalties(raw, seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not sampled:  # an all-greedy batch (a decode step's usual case) needs no gather of its rows
        tokens = x.argmax(dim=-1)
    else:
        tokens = torch.empty(len(seqs), dtype=torch.long, device=x.device)
        if greedy:
            tokens[greedy] = x[greedy].argmax(dim=-1)
        u = torch.tensor([seqs[i].next_uniform() for i in sampled], dtype=torch.float64)
        tokens[sampled] = draw(x[sampled], [seqs[i].params for i in sampled], u.to(x.device))
    return SampleResult(tokens.tolist(), _gather_logprobs(raw, tokens, seqs))


def apply_penalties(logits: torch.Tensor, seqs: list[SequenceSampler]) -> torch.Tensor:
    """Repetition, then presence/frequency penalties. logits: [B, V] fp32; not modified.

    Touches only the (row, token) pairs concerned: a dense [B, V] pass costs ~1 ms a row.
    """
    rep = [i for i, s in enumerate(seqs) if s.seen is not None]
    gen = [i for i, s in enumerate(seqs) if s.generated is not None]
    if not rep and not gen:
        return logits
    x = logits.clone()
    if rep:
        tallies = [seqs[i].seen for i in rep]
        rows, cols, _ = _flatten(rep, tallies, x.device)
        penalty = _spread([seqs[i].params.repetition_penalty for i in rep], tallies, x.device)
        picked = x[rows, cols]
        x[rows, cols] = torch.where(picked < 0, picked * penalty, picked / penalty)
    if gen:
        tallies = [seqs[i].generated for i in gen]
        rows, cols, counts = _flatten(gen, tallies, x.device)
        presence = _spread([seqs[i].params.presence_penalty for i in gen], tallies, x.device)
        frequency = _spread([seqs[i].params.frequency_penalty for i in gen], tallies, x.device)
        x[rows, cols] -= presence + frequency * counts  # every listed token has count > 0
    return x


def _flatten(
    rows: list[int], tallies: list[_TokenTally], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, token id and count [N] of every (row, distinct token) pair."""
    row_idx = _spread(rows, tallies, device).long()
    cols = torch.cat([t.ids for t in tallies]).to(device)
    counts = torch.cat([t.counts for t in tallies]).to(device)
    return row_idx, cols, counts


def _spread(values: list[float], tallies: list[_TokenTally], device: torch.device) -> torch.Tensor:
    """values[j] repeated once per distinct token of tallies[j]: [N] fp32."""
    lengths = torch.tensor([t.ids.numel() for t in tallies])
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), lengths).to(device)


def _gather_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, seqs: list[SequenceSampler]
) -> list[TokenLogprobs | None]:
    """raw: [B, V] fp32 model logits; tokens: [B] chosen ids."""
    result: list[TokenLogprobs | None] = [None] * len(seqs)
    asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not asked:
        return result
    rows = torch.tensor(asked, device=raw.device)
    logprobs = raw[rows].log_softmax(dim=-1)  # [A, V]
    chosen = logprobs.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
    num_top = max(seqs[i].params.logprobs for i in asked)
    top = logprobs.topk(min(num_top, raw.shape[-1]), dim=-1)
    top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(asked):
        n = seqs[i].params.logprobs
        result[i] = TokenLogprobs(chosen[j], top_ids[j][:n], top_values[j][:n])
    return result
