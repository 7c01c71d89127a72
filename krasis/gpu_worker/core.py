"""The GPU prefill core: prompts in, KV into the scheduler's pages, first token and a HandOff out; no transport."""

import dataclasses
import secrets

import torch

from krasis.common.kv_cache import KVCache
from krasis.common.protocol_pipeline import AddRequest, HandOff, TokenOut
from krasis.common.sampling import SequenceSampler
from krasis.common.sequence_state import (
    Plan,
    Sequence,
    append_token,
    check_page_table,
    check_state_slot,
    check_prompt,
    forward_batch,
    row_logprobs,
    sample_ready,
    schedule,
)
from krasis.gpu_worker.staging import DeviceStaging
from krasis.gpu_worker.streaming import chunk_batches
from krasis.gpu_worker.vram_plan import DEFAULT_STATE_SLOTS


class GpuPrefillCore:
    """Chunked prefill within `max_batch_tokens` per step into pages the request names (the scheduler owns them).

    When the model's device is not the KV pool's (cuda model, pool in host shared memory), or `staging_pages`
    is given, the model attends over DeviceStaging on its own device and each step's new KV (and the state rows
    of the prompts it finishes) is copied into the pool through KVHandOff. Prompts wait for their staging pages.

    With a `runner` (StreamingPrefill, model = runner.model) a step takes whole prompts, up to
    runner.plan.step_tokens tokens, runs them in chunks layer by layer while streamed experts arrive, and hands
    each layer's KV off as soon as it is final, so the device holds one layer's KV at a time. With a `cpu_route`
    too, steps the cost model gives to the CPU run on its CPU model, writing the pool directly.
    """

    def __init__(
        self, model, kv: KVCache, eos_token_ids: frozenset[int], vocab_size: int, max_batch_tokens: int,
        max_context: int | None = None, staging_pages: int | None = None, runner=None, cpu_route=None,
        staging_state_slots: int = DEFAULT_STATE_SLOTS,
    ):  # fmt: skip
        self.model, self.kv, self.eos_token_ids, self.vocab_size = model, kv, eos_token_ids, vocab_size
        self.runner, self.cpu_route = runner, cpu_route
        self.step_tokens = max_batch_tokens if runner is None else runner.plan.step_tokens
        self.max_context = max_context if max_context is not None else model.config.max_position_embeddings
        self.device = runner.device if runner is not None else next(model.parameters()).device
        self.has_state = any(model.state_widths)
        self.staging: DeviceStaging | None = None
        if staging_pages is not None or kv.layers[0].device != self.device:
            pages = staging_pages if staging_pages is not None else kv.num_pages
            if runner is not None:  # the plan counted one step's KV, one layer at a time, and its state rows
                pages = staging_pages or kv.pages_for(runner.plan.step_tokens)
                staging_state_slots = runner.plan.state_slots
            self.staging = DeviceStaging(kv, model.state_widths, pages, staging_state_slots, self.device,
                                         per_layer=runner is not None)  # fmt: skip
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def close(self) -> None:
        """Release the pool's registration (before the pool is unmapped)."""
        if self.staging is not None:
            self.staging.close()

    def add(self, request: AddRequest) -> None:
        """Queue a prompt; ValueError if it, its page table, its state slot or its id is unusable (nothing is queued then)."""
        prompt = list(request.prompt_ids)
        check_prompt(prompt, self.vocab_size, self.max_context)
        check_page_table(request.page_table, len(prompt), self.kv)
        check_state_slot(request.state_slot, self.has_state, self.kv)
        if any(s.request_id == request.request_id for s in self.waiting + self.running):
            raise ValueError(f"request {request.request_id!r} is already prefilling")
        if self.runner is not None and len(prompt) > self.step_tokens:
            raise ValueError(f"a {len(prompt)}-token prompt exceeds the {self.step_tokens}-token prefill step of the "
                             "VRAM plan")  # fmt: skip
        if self.staging is not None and not self.staging.fits(len(prompt)):
            raise ValueError(f"a {len(prompt)}-token prompt does not fit the {self.staging.pages.num_pages} staging pages")
        params = request.sampling
        if params.seed is None:  # decode continues the same random stream only from a known seed
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        sampler = SequenceSampler(params, prompt, self.vocab_size)
        seq = Sequence(request.request_id, prompt, len(prompt), params, sampler, list(request.page_table),
                       state_slot=request.state_slot)
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
        plan = self._schedule()
        if not plan:
            return [], []
        if self._routes_to_cpu(plan):
            model = self.cpu_route.cpu_model
            input_ids, batch = forward_batch(plan, self.kv, self.kv.layers[0].device)
            hidden = model(input_ids, batch)  # [T, H], KV and state written straight into the pool
        else:
            model, hidden, batch = self.model, *self._device_forward(plan)
        seqs, result = sample_ready(model, hidden, batch, plan)
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
        """Start waiting prompts, in order, while their staging fits (all at once without staging)."""
        while self.waiting:
            if self.staging is not None and not self.staging.admit(self.waiting[0]):
                return
            self.running.append(self.waiting.pop(0))

    def _schedule(self) -> Plan:
        """Prefill chunks within the step; with a runner whole prompts only (its staging keeps no KV between steps)."""
        if self.runner is None:
            return schedule(self.running, self.step_tokens)
        plan, room = [], self.step_tokens
        for seq in self.running:
            if seq.num_uncached > room:
                break
            plan.append((seq, seq.num_uncached))
            room -= seq.num_uncached
        return plan

    def _routes_to_cpu(self, plan: Plan) -> bool:
        """Only whole prompts go to the CPU (their KV must all come from one side)."""
        whole = all(s.num_cached == 0 and n == s.num_uncached for s, n in plan)
        return self.cpu_route is not None and whole and self.cpu_route.use_cpu(sum(n for _, n in plan))

    def _device_forward(self, plan: Plan):
        """The plan on the model's device (streamed when there is a runner), its results handed to the pool -> (hidden, batch)."""
        staging = self.staging
        kv, staged = (self.kv, plan) if staging is None else (staging.kv, staging.staged(plan))
        if self.runner is None:
            input_ids, batch = forward_batch(staged, kv, self.device)
            hidden = self.model(input_ids, batch)  # [T, H]
            if staging is not None:
                staging.begin(plan, batch.write_slots)
                staging.hand_off.copy_all()
            return hidden, batch
        input_ids, chunks, batch = chunk_batches(staged, kv, self.device, self.runner.plan.chunk_for(sum(n for _, n in plan)))
        if staging is None:
            return self.runner.forward(input_ids, chunks), batch
        staging.begin(plan, batch.write_slots)
        hidden = self.runner.forward(input_ids, chunks, after_layer=staging.hand_off.layer_done)  # [T, H]
        staging.hand_off.finish()
        return hidden, batch

    def _release_staging(self, seq: Sequence) -> None:
        if self.staging is not None:
            self.staging.release(seq.request_id)


def _hand_off(seq: Sequence) -> HandOff:
    """Everything decode needs: KV of all but the last token is already in the shared pages (kv_layers empty)."""
    return HandOff(seq.request_id, seq.token_ids, seq.num_prompt_tokens, seq.page_table, seq.params, [], seq.state_slot)
