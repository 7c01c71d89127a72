"""The in-process engine core: sequences in, one token per running sequence out per step; no transport."""

from dataclasses import dataclass, field

import torch

from krasis.common.kv_cache import ForwardBatch, KVCache, PageAllocator, SequenceSlice
from krasis.common.protocol import FinishReason
from krasis.common.sampling import SamplingParams, SequenceSampler, sample


@dataclass(frozen=True)
class EngineConfig:
    max_context: int  # prompt + generated tokens of one sequence
    kv_pages: int
    page_size: int = 16
    max_batch_tokens: int = 2048  # new tokens per forward step (bounds prefill activation memory)


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated
    num_prompt_tokens: int
    params: SamplingParams
    sampler: SequenceSampler
    page_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (None when a sequence ends without one) and, on the last event, why it ended."""

    request_id: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    logprobs: object = None


class EngineCore:
    """Continuous batching over one model: decodes first, then prefill chunks, within `max_batch_tokens`."""

    def __init__(self, model, config: EngineConfig, eos_token_ids: frozenset[int], vocab_size: int):
        self.model, self.config, self.eos_token_ids, self.vocab_size = model, config, eos_token_ids, vocab_size
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.kv = KVCache.allocate(model.kv_widths, config.kv_pages, config.page_size, dtype, self.device)
        self.allocator = PageAllocator(config.kv_pages)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError for prompts the model or the KV pool can never hold."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.config.max_context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context limit is {self.config.max_context}")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.kv.pages_for(self._reserved_tokens(len(prompt_ids), params)) > self.kv.num_pages:
            raise ValueError("prompt + max_tokens exceed the whole KV cache")
        sampler = SequenceSampler(params, prompt_ids, self.vocab_size)
        self.waiting.append(Sequence(request_id, list(prompt_ids), len(prompt_ids), params, sampler))

    def abort(self, request_id: str) -> None:
        for queue in (self.waiting, self.running):
            for seq in [s for s in queue if s.request_id == request_id]:
                queue.remove(seq)
                self.allocator.free(seq.page_table)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _reserved_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        return min(prompt_len + params.max_tokens, self.config.max_context)

    def _admit(self) -> None:
        """Move waiting sequences to running while their whole KV reservation fits."""
        while self.waiting:
            seq = self.waiting[0]
            pages = self.kv.pages_for(self._reserved_tokens(seq.num_prompt_tokens, seq.params))
            if pages > self.allocator.num_free:
                return
            seq.page_table = self.allocator.allocate(pages)
            self.running.append(self.waiting.pop(0))

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of new tokens) for this step: every decode, then prefill chunks."""
        budget, plan = self.config.max_batch_tokens, []
        decoding = [s for s in self.running if len(s.token_ids) - s.num_cached == 1]
        prefilling = [s for s in self.running if len(s.token_ids) - s.num_cached > 1]
        for seq in decoding + prefilling:
            take = min(len(seq.token_ids) - seq.num_cached, budget)
            if take <= 0:
                break
            plan.append((seq, take))
            budget -= take
        return plan

    def _forward_batch(self, plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, ForwardBatch]:
        ids, positions, write_slots, slices, start = [], [], [], [], 0
        for seq, take in plan:
            begin, end = seq.num_cached, seq.num_cached + take
            ids.extend(seq.token_ids[begin:end])
            positions.append(torch.arange(begin, end, device=self.device))
            write_slots.append(self.kv.slots(seq.page_table, begin, end, self.device))
            slices.append(SequenceSlice(start, take, self.kv.slots(seq.page_table, 0, end, self.device)))
            start += take
        batch = ForwardBatch(torch.cat(positions), torch.cat(write_slots), slices, self.kv)
        return torch.tensor(ids, dtype=torch.long, device=self.device), batch

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        self._admit()
        plan = self._schedule()
        if not plan:
            return []
        input_ids, batch = self._forward_batch(plan)
        hidden = self.model(input_ids, batch)
        for seq, take in plan:
            seq.num_cached += take
        ready = [i for i, (seq, _) in enumerate(plan) if seq.num_cached == len(seq.token_ids)]
        if not ready:
            return []
        logits = self.model.compute_logits(hidden[batch.last_token_indices[ready]])
        seqs = [plan[i][0] for i in ready]
        result = sample(logits, [s.sampler for s in seqs])
        return [self._append(seq, result, row) for row, seq in enumerate(seqs)]

    def _append(self, seq: Sequence, result, row: int) -> TokenEvent:
        token = int(result.token_ids[row])
        logprobs = result.logprobs[row] if result.logprobs is not None else None
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            self._finish(seq)
            return TokenEvent(seq.request_id, None, FinishReason.STOP, logprobs)
        seq.token_ids.append(token)
        seq.sampler.append(token)
        if seq.num_generated >= seq.params.max_tokens or len(seq.token_ids) >= self.config.max_context:
            self._finish(seq)
            return TokenEvent(seq.request_id, token, FinishReason.LENGTH, logprobs)
        return TokenEvent(seq.request_id, token, None, logprobs)

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.page_table)
