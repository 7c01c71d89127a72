"""One request at a time through the serving path, in-process: tokenize, GpuPrefillCore into the shared-memory
KV pool (the hand-off), then CpuDecodeCore from that pool; timed end to end."""

import time
from dataclasses import dataclass

import torch

from krasis.bench.models import PrefillSetup
from krasis.bench.prompts import tokenize_prompt
from krasis.common.kv_cache import PageAllocator
from krasis.common.process import freeze_loaded_objects
from krasis.common.protocol_pipeline import AddRequest
from krasis.common.sampling import SamplingParams
from krasis.common.shm import SharedKVPool, shared_kv_cache
from krasis.cpu_worker.core import CpuDecodeCore
from krasis.gpu_worker.core import GpuPrefillCore

PAGE_SIZE = 16
KV_POOL_PREFIX = "krasis-bench-kv"


@dataclass(frozen=True)
class RequestTiming:
    prompt_tokens: int
    ttft_s: float  # text in -> first token out, with its KV in the shared pool
    tokenize_s: float
    decode_tokens: int
    decode_step_s: tuple[float, ...]  # each decode step after the hand-off (none when none were asked for)

    @property
    def decode_s(self) -> float:
        return sum(self.decode_step_s)


class BenchPipeline:
    """The prefill and decode cores over one shared KV pool sized for the longest request; the page
    allocation the gateway does is done here."""

    def __init__(self, prefill: PrefillSetup, decode_model, tokenizer, max_tokens: int, chunk_tokens: int,
                 dtype: torch.dtype):  # fmt: skip
        self.tokenizer, self.vocab_size = tokenizer, decode_model.config.vocab_size
        pages = -(-max_tokens // PAGE_SIZE)
        self.pool = SharedKVPool.create(KV_POOL_PREFIX, decode_model.kv_widths, pages, PAGE_SIZE, dtype,
                                        state_widths=decode_model.state_widths, num_state_slots=1)  # fmt: skip
        self.state_slot = 0 if any(decode_model.state_widths) else None  # one request at a time
        kv = shared_kv_cache(self.pool)
        self.allocator = PageAllocator(pages)
        self.prefill = GpuPrefillCore(prefill.model, kv, frozenset(), self.vocab_size, chunk_tokens,
                                      max_context=max_tokens, runner=prefill.runner)  # fmt: skip
        self.decode = CpuDecodeCore(decode_model, kv, frozenset(), self.vocab_size, max_tokens)
        self.device = self.prefill.device
        freeze_loaded_objects()  # as a serving worker does once loaded

    def close(self) -> None:
        self.prefill.close()  # the pool's CUDA registration goes before its mapping
        self.pool.close()

    def run(self, text: str, prompt_tokens: int, decode_tokens: int) -> RequestTiming:
        """Prefill the first `prompt_tokens` tokens of `text`, then decode `decode_tokens` greedy tokens."""
        # one token more than prefill's first: a request that ends in prefill has no hand-off to time
        params = SamplingParams(max_tokens=max(decode_tokens, 1) + 1, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        ids = tokenize_prompt(self.tokenizer, text, prompt_tokens, self.vocab_size)
        tokenize_s = time.perf_counter() - start
        if len(ids) != prompt_tokens:
            raise ValueError(f"the prompt text gave {len(ids)} tokens, not {prompt_tokens}")
        pages = self.allocator.allocate(-(-(prompt_tokens + params.max_tokens) // PAGE_SIZE))
        try:
            hand_off = self._prefill(AddRequest(f"bench-{prompt_tokens}", ids, params, pages, self.state_slot))
            ttft_s = time.perf_counter() - start
            step_s = self._decode(hand_off, decode_tokens)
        finally:
            self.allocator.free(pages)
        return RequestTiming(prompt_tokens, ttft_s, tokenize_s, decode_tokens, step_s)

    def _prefill(self, request: AddRequest):
        self.prefill.add(request)
        hand_offs = []
        while not hand_offs:
            _, hand_offs = self.prefill.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the KV copies into the pool are done before the clock stops
        return hand_offs[0]

    def _decode(self, hand_off, decode_tokens: int) -> tuple[float, ...]:
        """Seconds of each decode step after the hand-off."""
        if decode_tokens == 0:
            return ()
        self.decode.add(hand_off)
        steps, step_s = 0, []
        while self.decode.has_work:
            start = time.perf_counter()
            steps += len(self.decode.step())
            step_s.append(time.perf_counter() - start)
        if steps != decode_tokens:
            raise RuntimeError(f"decode gave {steps} tokens, expected {decode_tokens}")
        return tuple(step_s)
