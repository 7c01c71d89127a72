"""The CPU decode core: prefilled sequences in (HandOff), one token per sequence per step out; no transport."""

import torch

from krasis.common.kv_cache import KVCache
from krasis.common.protocol_pipeline import HandOff, TokenOut
from krasis.common.sampling import SequenceSampler
from krasis.common.sequence_state import (
    Sequence,
    append_token,
    check_page_table,
    check_state_slot,
    check_prompt,
    forward_batch,
    reserved_tokens,
    row_logprobs,
    sample_ready,
    schedule,
)


class CpuDecodeCore:
    """Continuous batching decode over KV pages the scheduler owns: a sequence joins on add() and leaves when done.

    Finish rules are EngineCore's (EOS unemitted, max_tokens, context limit); the sampler resumes from
    (params with seed, prompt, output so far), so seeded sampling continues the prefill worker's stream.
    """

    def __init__(self, model, kv: KVCache, eos_token_ids: frozenset[int], vocab_size: int, max_context: int):
        self.model, self.kv, self.eos_token_ids, self.vocab_size = model, kv, eos_token_ids, vocab_size
        self.max_context = max_context
        self.has_state = any(model.state_widths)
        self.device = next(model.parameters()).device
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.running)

    def add(self, hand_off: HandOff) -> None:
        """Join the decode batch; ValueError if the hand-off is inconsistent (nothing joins then)."""
        seq = self._sequence(hand_off)
        if hand_off.kv_layers:
            self._write_kv(seq, hand_off.kv_layers)
        self.running.append(seq)

    def abort(self, request_id: str) -> None:
        """Drop a sequence: no more tokens for it. Its pages stay the scheduler's to free."""
        self.running = [s for s in self.running if s.request_id != request_id]

    @torch.inference_mode()
    def step(self) -> list[TokenOut]:
        """One token for every running sequence."""
        plan = schedule(self.running, len(self.running))
        if not plan:
            return []
        input_ids, batch = forward_batch(plan, self.kv, self.device)
        hidden = self.model(input_ids, batch)  # [B, H]
        seqs, result = sample_ready(self.model, hidden, batch, plan)
        events = []
        for row, seq in enumerate(seqs):
            index = seq.num_generated  # output position of this token, or the count so far if none comes
            token, reason = append_token(seq, result.token_ids[row], self.eos_token_ids, self.max_context)
            if reason is not None:
                self.running.remove(seq)
            events.append(TokenOut(seq.request_id, index, token, reason, row_logprobs(result, row)))
        return events

    def _sequence(self, h: HandOff) -> Sequence:
        prompt, output = h.token_ids[: h.num_prompt_tokens], h.token_ids[h.num_prompt_tokens :]
        check_prompt(prompt, self.vocab_size, self.max_context)
        if not output:
            raise ValueError(f"hand-off {h.request_id!r} carries no sampled token")
        if len(h.token_ids) >= self.max_context:
            raise ValueError(f"hand-off {h.request_id!r} already fills the context ({self.max_context} tokens)")
        if h.sampling.seed is None and not h.sampling.greedy:
            raise ValueError(f"hand-off {h.request_id!r} has no seed: decode cannot continue its random stream")
        if any(s.request_id == h.request_id for s in self.running):
            raise ValueError(f"request {h.request_id!r} is already decoding")
        # KV is written up to the token before the last one the sequence may ever hold
        check_page_table(h.page_table, reserved_tokens(len(prompt), h.sampling, self.max_context) - 1, self.kv)
        check_state_slot(h.state_slot, self.has_state, self.kv)
        sampler = SequenceSampler(h.sampling, prompt, self.vocab_size, output)
        return Sequence(h.request_id, list(h.token_ids), len(prompt), h.sampling, sampler, list(h.page_table),
                        num_cached=len(h.token_ids) - 1, state_slot=h.state_slot)  # fmt: skip

    def _write_kv(self, seq: Sequence, kv_layers: list[torch.Tensor]) -> None:
        """KV that came with the hand-off (a decode pool without the shared pool): kv_layers[l]: [n - 1, width]."""
        if len(kv_layers) != len(self.kv.layers):
            raise ValueError(f"hand-off carries KV of {len(kv_layers)} layers, the model has {len(self.kv.layers)}")
        widths = [layer.shape[1] for layer in self.kv.layers]
        shapes = [tuple(values.shape) for values in kv_layers]
        if shapes != [(seq.num_cached, width) for width in widths]:
            raise ValueError(f"hand-off KV shapes {shapes} do not match [{seq.num_cached}, width] of widths {widths}")
        slots = self.kv.slots(seq.page_table, 0, seq.num_cached, self.kv.layers[0].device)
        for layer, values in enumerate(kv_layers):
            self.kv.write(layer, slots, values)
