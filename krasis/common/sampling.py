"""Token sampling: request parameters, per-sequence state, and one batched sampling step.

Order of operations matches transformers' generate(): repetition penalty, presence/frequency
penalty, then greedy argmax or temperature -> top-k -> top-p -> min-p -> draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_ABS_PENALTY = 2.0
# Temperatures below this are greedy: dividing logits by them overflows fp32.
GREEDY_TEMPERATURE = 1e-5
# top-p looks for its nucleus among this many best tokens first; a full sort of a 150K vocab
# costs ~15 ms a row on CPU, top-k of 1024 well under 1 ms.
TOP_P_WINDOW = 1024

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (OpenAI request fields plus HF repetition_penalty)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy (argmax after penalties)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 => off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    repetition_penalty: float = 1.0  # HF/CTRL semantics, over prompt + generated tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N >= 0: chosen token's logprob and the top N

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError("<field>: <reason>") for the first out-of-range field."""
        _check_int("max_tokens", self.max_tokens, low=0)
        _check_float("temperature", self.temperature, self.temperature >= 0, "must be >= 0")
        _check_float("top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]")
        _check_int("top_k", self.top_k, low=-1, high=vocab_size)
        _check_float("min_p", self.min_p, 0 <= self.min_p <= 1, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            ok = -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY
            _check_float(name, value, ok, f"must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}]")
        penalty = self.repetition_penalty
        _check_float("repetition_penalty", penalty, penalty > 0, "must be > 0")
        if self.seed is not None:
            _check_int("seed", self.seed)
        self._validate_stop()
        if not isinstance(self.ignore_eos, bool):
            raise ValueError("ignore_eos: must be a bool")
        if self.logprobs is not None:
            high = MAX_LOGPROBS if vocab_size is None else min(MAX_LOGPROBS, vocab_size)
            _check_int("logprobs", self.logprobs, low=0, high=high)

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise ValueError("stop: must be a tuple of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: each entry must be a non-empty string, got {s!r}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")


def _check_float(name: str, value, in_range: bool, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if not in_range:
        raise ValueError(f"{name}: {reason}, got {value}")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


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
        # seen_mask: [V] bool, prompt + output ids; output_counts: [V] fp32, output ids only.
        self.seen_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen_mask = torch.zeros(vocab_size, dtype=torch.bool)
            prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
            self._check_prompt_ids(prompt)
            self.seen_mask[prompt] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        for token_id in output_ids:
            self.append(token_id)

    def _check_prompt_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"prompt ids must be in [0, {self.vocab_size}), got {low}..{high}")

    def append(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside vocab of {self.vocab_size}")
        if self.seen_mask is not None:
            self.seen_mask[token_id] = True
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
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
    raw = logits.float()
    x = apply_penalties(raw, seqs)
    tokens = torch.empty(len(seqs), dtype=torch.long, device=x.device)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if greedy:
        rows = torch.tensor(greedy, device=x.device)
        tokens[rows] = x[rows].argmax(dim=-1)
    if sampled:
        rows = torch.tensor(sampled, device=x.device)
        warped = apply_warpers(x[rows], [seqs[i].params for i in sampled])
        u = torch.tensor([seqs[i].next_uniform() for i in sampled], dtype=torch.float64)
        tokens[rows] = _inverse_cdf_draw(warped.softmax(dim=-1), u.to(x.device))
    return SampleResult(tokens.tolist(), _gather_logprobs(raw, tokens, seqs))


def apply_penalties(logits: torch.Tensor, seqs: list[SequenceSampler]) -> torch.Tensor:
    """Repetition, then presence/frequency penalties. logits: [B, V] fp32; not modified."""
    rep = [i for i, s in enumerate(seqs) if s.seen_mask is not None]
    freq = [i for i, s in enumerate(seqs) if s.output_counts is not None]
    if not rep and not freq:
        return logits
    x = logits.clone()
    device = x.device
    if rep:
        rows = torch.tensor(rep, device=device)
        seen = torch.stack([seqs[i].seen_mask for i in rep]).to(device)  # [R, V]
        penalty = _column([seqs[i].params.repetition_penalty for i in rep], device)
        sub = x[rows]
        penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
        x[rows] = torch.where(seen, penalized, sub)
    if freq:
        rows = torch.tensor(freq, device=device)
        counts = torch.stack([seqs[i].output_counts for i in freq]).to(device)  # [F, V]
        presence = _column([seqs[i].params.presence_penalty for i in freq], device)
        frequency = _column([seqs[i].params.frequency_penalty for i in freq], device)
        x[rows] -= presence * (counts > 0) + frequency * counts
    return x


def apply_warpers(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, as transformers' warpers. logits: [S, V] fp32.

    Filtered tokens become -inf. Rows must not be greedy. Each filter looks only at the
    rows that use it: a full-vocab sort or top-k on the others would be wasted.
    """
    x = logits
    if any(p.temperature != 1.0 for p in params):
        x = x / _column([p.temperature for p in params], x.device)
    k_rows = [i for i, p in enumerate(params) if p.top_k > 0]
    if k_rows:
        floor = _top_k_floor(x[k_rows], [params[i].top_k for i in k_rows])
        x = _mask_rows_below(x, k_rows, floor)
    p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if p_rows:
        top_p = torch.tensor([params[i].top_p for i in p_rows], device=x.device)
        x = _mask_rows_below(x, p_rows, _top_p_floor(x[p_rows], top_p))
    if any(p.min_p > 0.0 for p in params):
        probs = x.softmax(dim=-1)
        floor = _column([p.min_p for p in params], x.device) * probs.amax(dim=-1, keepdim=True)
        x = x.masked_fill(probs < floor, -math.inf)
    return x


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _mask_rows_below(x: torch.Tensor, rows: list[int], floor: torch.Tensor) -> torch.Tensor:
    """Set x[rows[j], v] to -inf where it is below floor[j]; ties with the floor stay."""
    full_floor = torch.full((x.shape[0],), -math.inf, device=x.device)
    full_floor[rows] = floor
    return x.masked_fill(x < full_floor.unsqueeze(1), -math.inf)


def _top_k_floor(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """The k-th largest logit of each row. x: [R, V]; returns [R]."""
    ks = torch.tensor([min(k, x.shape[-1]) for k in top_k], device=x.device)
    best = x.topk(int(ks.max()), dim=-1).values  # [R, kmax], descending
    return best.gather(1, ks.unsqueeze(1) - 1).squeeze(1)


def _top_p_floor(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest logit of each row's nucleus. x: [R, V]; top_p: [R] in (0, 1).

    Looks among the best TOP_P_WINDOW tokens first and sorts the whole row only where
    they hold less than top_p of the mass.
    """
    floor, covered = _nucleus_floor(x, top_p, min(TOP_P_WINDOW, x.shape[-1]))
    if not bool(covered.all()):
        short = (~covered).nonzero().squeeze(1)
        floor[short] = _nucleus_floor(x[short], top_p[short], x.shape[-1])[0]
    return floor


def _nucleus_floor(
    x: torch.Tensor, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus floor [R] among each row's best `width` logits, and whether they cover top_p.

    TopPLogitsWarper drops a token when the mass at or below it is <= 1 - p, i.e. it keeps
    a token when the mass strictly above it is < p.
    """
    if width == x.shape[-1]:
        best = x.sort(dim=-1, descending=True).values  # [R, V]
    else:
        best = x.topk(width, dim=-1).values  # [R, W], descending
    probs = (best - x.logsumexp(dim=-1, keepdim=True)).exp()
    cumulative = probs.cumsum(dim=-1)
    num_kept = (cumulative - probs < top_p.unsqueeze(1)).sum(dim=-1).clamp(min=1)
    floor = best.gather(1, (num_kept - 1).unsqueeze(1)).squeeze(1)
    return floor, cumulative[:, -1] >= top_p


def _inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [S] drawn from probs [S, V] (need not sum to 1) with uniforms u [S] fp64."""
    # fp64 prefix sums: in fp32, tokens below ~1e-7 of the running mass would vanish.
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    # Strictly below the total, so the first cdf entry above target has nonzero mass.
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


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
