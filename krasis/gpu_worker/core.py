"""The GPU prefill core: prompts in, KV into the scheduler's pages, first token and a HandOff out; no transport."""

import dataclasses
import secrets

import torch

from krasis.common.kv_cache import KVCache, PageAllocator
from krasis.common.protocol_pipeline import AddRequest, HandOff, TokenOut
from krasis.common.sampling import SequenceSampler
from krasis.common.sequence_state import (
    Plan,
    Sequence,
    append_token,
    check_page_table,
    check_prompt,
    forward_batch,
    row_logprobs,
    sample_ready,
    schedule,
)


class GpuPrefillCore:
    """Chunked prefill within `max_batch_tokens` per step into pages the request names (the scheduler owns them).

    When the model's device is not the KV pool's (cuda model, pool in host shared memory), or `staging_pages`
    is given, the model attends over a staging KVCache on its own device and each step's new KV is copied
    into the pool with one indexed copy per layer. Prompts wait until their whole prompt fits the staging pages.
    """

    def __init__(
        self, model, kv: KVCache, eos_token_ids: frozenset[int], vocab_size: int, max_batch_tokens: int,
        max_context: int | None = None, staging_pages: int | None = None,
    ):  # fmt: skip
        self.model, self.kv, self.eos_token_ids, self.vocab_size = model, kv, eos_token_ids, vocab_size
        self.max_batch_tokens = max_batch_tokens
        self.max_context = max_context if max_context is not None else model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.staging: KVCache | None = None
        if staging_pages is not None or kv.layers[0].device != self.device:
            pages = staging_pages if staging_pages is not None else kv.num_pages
            widths = [layer.shape[1] for layer in kv.layers]
            self.staging = KVCache.allocate(widths, pages, kv.page_size, kv.layers[0].dtype, self.device)
            self.staging_allocator = PageAllocator(pages)
        self.staging_tables: dict[str, list[int]] = {}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: AddRequest) -> None:
        """Queue a prompt; ValueError if it, its page table or its id is unusable (nothing is queued then)."""
        prompt = list(request.prompt_ids)
        check_prompt(prompt, self.vocab_size, self.max_context)
        check_page_table(request.page_table, len(prompt), self.kv)
        if any(s.request_id == request.request_id for s in self.waiting + self.running):
            raise ValueError(f"request {request.request_id!r} is already prefilling")
        if self.staging is not None and self.staging.pages_for(len(prompt)) > self.staging.num_pages:
            raise ValueError(f"a {len(prompt)}-token prompt does not fit the {self.staging.num_pages} staging pages")
        params = request.sampling
        if params.seed is None:  # decode continues the same random stream only from a known seed
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        sampler = SequenceSampler(params, prompt, self.vocab_size)
        seq = Sequence(request.request_id, prompt, len(prompt), params, sampler, list(request.page_table))
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Forget a sequence: no token or hand-off for it after this. Its pool pages stay the scheduler's."""
        for queue in (self.waiting, self.running):
            for seq in [s for s in queue if s.request_id == request_id]:
                queue.remove(seq)
                self._release_staging(seq)

    @torch.inference_mode()
    def step(self) -> tuple[list[TokenOut], list[HandOff]]:
        """One forward over prefill chunks: first tokens of the prompts that completed and their hand-offs."""
        self._admit()
        plan = schedule(self.running, self.max_batch_tokens)
        if not plan:
            return [], []
        tables = None if self.staging is None else [self.staging_tables[s.request_id] for s, _ in plan]
        input_ids, batch = forward_batch(plan, self.staging or self.kv, self.device, tables)
        hidden = self.model(input_ids, batch)  # [T, H]
        if self.staging is not None:
            self._copy_to_pool(plan, batch.write_slots)
        seqs, result = sample_ready(self.model, hidden, batch, plan)
        tokens, hand_offs = [], []
        for row, seq in enumerate(seqs):
            token, reason = append_token(seq, result.token_ids[row], self.eos_token_ids, self.max_context)
            self.running.remove(seq)
            self._release_staging(seq)
            tokens.append(TokenOut(seq.request_id, 0, token, reason, row_logprobs(result, row)))
            if reason is None:
                hand_offs.append(_hand_off(seq))
        return tokens, hand_offs

    def _admit(self) -> None:
        """Start waiting prompts, in order, while their staging pages fit (all at once without staging)."""
        while self.waiting:
            seq = self.waiting[0]
            if self.staging is not None:
                pages = self.staging.pages_for(seq.num_prompt_tokens)
                if pages > self.staging_allocator.num_free:
                    return
                self.staging_tables[seq.request_id] = self.staging_allocator.allocate(pages)
            self.running.append(self.waiting.pop(0))

    def _copy_to_pool(self, plan: Plan, staging_slots: torch.Tensor) -> None:
        """This step's new KV (before num_cached advances), staging slots -> the request's pool slots."""
        pool_device = self.kv.layers[0].device
        new_slots = [self.kv.slots(s.page_table, s.num_cached, s.num_cached + n, pool_device) for s, n in plan]
        pool_slots = torch.cat(new_slots)
        for pool_layer, staging_layer in zip(self.kv.layers, self.staging.layers):
            pool_layer.index_copy_(0, pool_slots, staging_layer.index_select(0, staging_slots).to(pool_device))

    def _release_staging(self, seq: Sequence) -> None:
        table = self.staging_tables.pop(seq.request_id, None)
        if table is not None:
            self.staging_allocator.free(table)


def _hand_off(seq: Sequence) -> HandOff:
    """Everything decode needs: KV of all but the last token is already in the shared pages (kv_layers empty)."""
    return HandOff(seq.request_id, seq.token_ids, seq.num_prompt_tokens, seq.page_table, seq.params, [])
