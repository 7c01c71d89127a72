"""Per-sequence state and the step pieces every core shares: scheduling, batch building, sampling, finish rules.

EngineCore (one process), GpuPrefillCore and CpuDecodeCore (the pipeline) all run a step as
schedule -> forward_batch -> model -> sample_ready -> append_token; only who owns the pages differs.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from krasis.common.kv_cache import ForwardBatch, KVCache, SequenceSlice
from krasis.common.protocol import FinishReason
from krasis.common.sampling import SampleResult, SamplingParams, SequenceSampler, sample

Plan = list[tuple["Sequence", int]]  # (sequence, number of new tokens) of one forward step


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated
    num_prompt_tokens: int
    params: SamplingParams
    sampler: SequenceSampler
    page_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV (and, for linear-attention layers, state) is in the cache
    state_slot: int | None = None  # its row in KVCache.states; None for models without per-sequence state

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached


def reserved_tokens(prompt_len: int, params: SamplingParams, max_context: int) -> int:
    """Tokens a sequence may ever hold: what its KV page reservation must cover."""
    return min(prompt_len + params.max_tokens, max_context)


def check_prompt(prompt_ids: list[int], vocab_size: int, max_context: int) -> None:
    """ValueError for a prompt no model run can take."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if len(prompt_ids) >= max_context:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context limit is {max_context}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:  # two C loops: a 32K-token prompt in ~0.5 ms
        bad = next(t for t in prompt_ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def check_page_table(page_table: list[int], num_tokens: int, kv: KVCache) -> None:
    """ValueError unless `page_table` names real pages enough for `num_tokens` tokens."""
    if any(not 0 <= p < kv.num_pages for p in page_table):
        raise ValueError(f"page table names pages outside the KV pool (0..{kv.num_pages - 1})")
    if len(page_table) < kv.pages_for(num_tokens):
        raise ValueError(f"{len(page_table)} KV pages cannot hold {num_tokens} tokens of {kv.page_size} a page")


def check_state_slot(state_slot: int | None, has_state: bool, kv: KVCache) -> None:
    """ValueError unless a model with per-sequence state is given a state slot of the pool (others ignore it)."""
    if has_state and not (state_slot is not None and 0 <= state_slot < kv.num_state_slots):
        raise ValueError(f"this model keeps per-sequence state: it needs a state slot in 0..{kv.num_state_slots - 1}, "
                         f"got {state_slot}")  # fmt: skip


def schedule(running: list[Sequence], budget: int) -> Plan:
    """Every decoding sequence (one new token), then prefill chunks, within `budget` new tokens."""
    plan = []
    decoding = [s for s in running if s.num_uncached == 1]
    prefilling = [s for s in running if s.num_uncached > 1]
    for seq in decoding + prefilling:
        take = min(seq.num_uncached, budget)
        if take <= 0:
            break
        plan.append((seq, take))
        budget -= take
    return plan


def forward_batch(plan: Plan, kv: KVCache, device, page_tables: list[list[int]] | None = None):
    """(input ids [T], ForwardBatch) of a plan; `page_tables` overrides each sequence's own (a staging cache)."""
    tables = page_tables if page_tables is not None else [seq.page_table for seq, _ in plan]
    ids, positions, write_slots, slices, start = [], [], [], [], 0
    for (seq, take), table in zip(plan, tables):
        begin, end = seq.num_cached, seq.num_cached + take
        ids.extend(seq.token_ids[begin:end])
        positions.append(torch.arange(begin, end, device=device))
        write_slots.append(kv.slots(table, begin, end, device))
        slices.append(SequenceSlice(start, take, kv.context(table, end, device), seq.state_slot))
        start += take
    batch = ForwardBatch(torch.cat(positions), torch.cat(write_slots), slices, kv)
    # through numpy: torch.tensor of a list is ~4x slower (a 32K-token prompt's ids: ~3 ms)
    return torch.from_numpy(np.array(ids, dtype=np.int64)).to(device), batch


def sample_ready(model, hidden: torch.Tensor, batch: ForwardBatch, plan: Plan) -> tuple[list[Sequence], SampleResult]:
    """Mark the plan's tokens cached and sample the sequences with nothing left uncached. hidden: [T, H]."""
    for seq, take in plan:
        seq.num_cached += take
    ready = [i for i, (seq, _) in enumerate(plan) if seq.num_uncached == 0]
    if not ready:
        return [], SampleResult([], [])
    # every sequence ready with one token (a decode step): the rows are all of hidden, in order, and need no gather
    last_hidden = hidden if len(ready) == hidden.shape[0] else hidden[batch.last_token_indices[ready]]
    logits = model.compute_logits(last_hidden)  # [R, V]
    seqs = [plan[i][0] for i in ready]
    return seqs, sample(logits, [s.sampler for s in seqs])


def append_token(
    seq: Sequence, token: int, eos_token_ids: frozenset[int], max_context: int
) -> tuple[int | None, FinishReason | None]:
    """Apply a sampled token: (token to emit or None for an unemitted EOS, finish reason or None)."""
    if token in eos_token_ids and not seq.params.ignore_eos:
        return None, FinishReason.STOP
    seq.token_ids.append(token)
    seq.sampler.append(token)
    if seq.num_generated >= seq.params.max_tokens or len(seq.token_ids) >= max_context:
        return token, FinishReason.LENGTH
    return token, None


def row_logprobs(result: SampleResult, row: int):
    return result.logprobs[row] if result.logprobs is not None else None
