"""Drive our model directly over a KV cache: teacher-forced logits for whole or piecewise sequences."""

import torch

from krasis.common.kv_cache import ForwardBatch, KVCache, SequenceSlice


class SingleSequence:
    """One sequence's KV pages (and state slot 0, for models with per-sequence state), fed token chunks in order."""

    def __init__(self, model, max_tokens: int, page_size: int = 16):
        param = next(model.parameters())
        pages = -(-max_tokens // page_size)
        self.model, self.device = model, param.device
        self.kv = KVCache.allocate(
            model.kv_widths, pages, page_size, param.dtype, param.device, model.state_widths, num_state_slots=1
        )
        self.page_table = list(range(pages))
        self.num_cached = 0

    @torch.inference_mode()
    def feed(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len(token_ids), V] for each fed token's next-token distribution."""
        begin, end = self.num_cached, self.num_cached + len(token_ids)
        batch = ForwardBatch(
            positions=torch.arange(begin, end, device=self.device),
            write_slots=self.kv.slots(self.page_table, begin, end, self.device),
            seqs=[SequenceSlice(0, len(token_ids), self.kv.slots(self.page_table, 0, end, self.device), state_slot=0)],
            kv=self.kv,
        )
        hidden = self.model(torch.tensor(token_ids, device=self.device), batch)
        self.num_cached = end
        return self.model.compute_logits(hidden).cpu()


def teacher_forced_logits(model, token_ids: list[int]) -> torch.Tensor:
    return SingleSequence(model, len(token_ids)).feed(token_ids)


def reference_logits(reference, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0].float()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the logits' scale (their max abs value)."""
    return float((ours - ref).abs().max() / ref.abs().max())


def median_token_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over tokens of the max abs error relative to the logits' scale: robust to a flipped router choice."""
    return float(((ours - ref).abs().amax(dim=-1) / ref.abs().max()).median())
