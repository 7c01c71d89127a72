"""The in-process engine core: sequences in, one token per running sequence out per step; no transport."""

from dataclasses import dataclass

import torch

from krasis.common.kv_cache import KVCache, PageAllocator
from krasis.common.protocol import FinishReason
from krasis.common.sampling import SamplingParams, SequenceSampler
from krasis.common.sequence_state import (
    Sequence,
    append_token,
    check_prompt,
    forward_batch,
    reserved_tokens,
    row_logprobs,
    sample_ready,
    schedule,
)


@dataclass(frozen=True)
class EngineConfig:
    max_context: int  # prompt + generated tokens of one sequence
    kv_pages: int
    page_size: int = 16
    max_batch_tokens: int = 2048  # new tokens per forward step (bounds prefill activation memory)
    state_slots: int = 64  # sequences running at once, for models with per-sequence state (linear attention)


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
        self.kv = KVCache.allocate(
            model.kv_widths, config.kv_pages, config.page_size, dtype, self.device,
            state_widths=model.state_widths, num_state_slots=config.state_slots,
        )  # fmt: skip
        self.allocator = PageAllocator(config.kv_pages)
        # One state row per running sequence, only for models that keep per-sequence state.
        self.state_allocator = PageAllocator(self.kv.num_state_slots) if self.kv.num_state_slots else None
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError for prompts the model or the KV pool can never hold."""
        check_prompt(prompt_ids, self.vocab_size, self.config.max_context)
        if self.kv.pages_for(self._reserved_tokens(len(prompt_ids), params)) > self.kv.num_pages:
            raise ValueError("prompt + max_tokens exceed the whole KV cache")
        sampler = SequenceSampler(params, prompt_ids, self.vocab_size)
        self.waiting.append(Sequence(request_id, list(prompt_ids), len(prompt_ids), params, sampler))

    def abort(self, request_id: str) -> None:
        for queue in (self.waiting, self.running):
            for seq in [s for s in queue if s.request_id == request_id]:
                queue.remove(seq)
                self._release(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _reserved_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        return reserved_tokens(prompt_len, params, self.config.max_context)

    def _admit(self) -> None:
        """Move waiting sequences to running while their whole KV reservation fits."""
        while self.waiting:
            seq = self.waiting[0]
            pages = self.kv.pages_for(self._reserved_tokens(seq.num_prompt_tokens, seq.params))
            if pages > self.allocator.num_free or (self.state_allocator and not self.state_allocator.num_free):
                return
            seq.page_table = self.allocator.allocate(pages)
            if self.state_allocator is not None:
                seq.state_slot = self.state_allocator.allocate(1)[0]
            self.running.append(self.waiting.pop(0))

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        self._admit()
        plan = schedule(self.running, self.config.max_batch_tokens)
        if not plan:
            return []
        input_ids, batch = forward_batch(plan, self.kv, self.device)
        hidden = self.model(input_ids, batch)
        seqs, result = sample_ready(self.model, hidden, batch, plan)
        events = []
        for row, seq in enumerate(seqs):
            token, reason = append_token(seq, result.token_ids[row], self.eos_token_ids, self.config.max_context)
            if reason is not None:
                self._finish(seq)
            events.append(TokenEvent(seq.request_id, token, reason, row_logprobs(result, row)))
        return events

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.page_table)
        seq.page_table = []
        if seq.state_slot is not None:
            self.state_allocator.free([seq.state_slot])
            seq.state_slot = None
