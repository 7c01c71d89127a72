"""The streaming prefill executor: a whole prefill step (every chunk of every prompt in it) goes through one
layer before the next, so each streamed layer's experts cross PCIe once per step; while one group of layers
computes, the next group's experts copy host -> device into the other buffer on a copy stream (events order
the two). KV is written per layer and chunks run in order, so this equals the plain forward exactly."""

import contextlib
import dataclasses

import torch

from krasis.common.kernels.gpu.fused_moe import compile_kernels, fused_available
from krasis.common.kv_cache import ForwardBatch, KVCache, SequenceSlice
from krasis.common.layers.attention import warm_chunk_attention
from krasis.common.sequence_state import Plan, forward_batch
from krasis.gpu_worker.device_model import StreamedExperts, attention_widths, buffer_views
from krasis.gpu_worker.host_memory import HostRegistration
from krasis.gpu_worker.kv_handoff import layer_staging
from krasis.gpu_worker.vram_plan import VramPlan

Chunks = list[tuple[slice, ForwardBatch]]  # rows of the step's flat tokens, and their batch


class StreamingPrefill:
    """Built by `build_prefill_runner` (krasis.gpu_worker.prefill_runner); `forward` runs one step."""

    def __init__(self, model, experts: dict[int, StreamedExperts], plan: VramPlan, device):
        self.model, self.experts, self.plan, self.device = model, experts, plan, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = model.model.embed_tokens.weight.dtype  # activations and the KV staging
        for layer_experts in experts.values():
            layer_experts.scratch_bytes = plan.expert_scratch_bytes
        for i in plan.resident_expert_layers:
            experts[i].bind([t.to(self.device) for t in experts[i].host_tensors])
        streamed = [t for g in plan.groups for i in g for t in experts[i].host_tensors]
        self.registration = HostRegistration(streamed) if self.cuda and streamed else None
        sources = iter(self.registration.sources if self.registration else streamed)
        self.sources = {i: [next(sources) for _ in experts[i].host_tensors] for g in plan.groups for i in g}
        self.buffers = [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=self.device) for _ in range(plan.num_buffers)]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.group_of = {i: g for g, layers in enumerate(plan.groups) for i in layers}
        self._ready: list = []
        self._done: list = []
        if self.cuda and experts:
            self._compile_expert_kernels(next(iter(experts.values())))
        if self.cuda and plan.shape is not None and plan.shape.query_bucket:
            warm_chunk_attention(*attention_widths(model.config), plan.chunk_tokens, self.dtype, self.device)

    def _compile_expert_kernels(self, experts: StreamedExperts) -> None:
        """Triton compiles at start, not inside the first prompts (one compile per row-block height)."""
        gate_up, down = experts.stand_in(self.device)
        x = torch.zeros(1, gate_up.shape[2], dtype=self.dtype, device=self.device)
        if fused_available(x, gate_up, experts.hidden_act):
            compile_kernels(gate_up, down, getattr(self.model.config, "num_experts_per_tok", 1))

    def close(self) -> None:
        if self.registration is not None:
            torch.cuda.synchronize(self.device)
            self.registration.close()
            self.registration = None

    def forward(self, input_ids: torch.Tensor, chunks: Chunks, after_layer=None) -> torch.Tensor:
        # input_ids: [T] -> final hidden states [T, H]; after_layer(i) runs once layer i's KV is all written
        groups = self.plan.groups
        self._ready, self._done = [None] * len(groups), [None] * len(groups)
        # [T, H], the step's only [T, H] tensor: layers and the norm work in place. A host embedding's rows copy
        # over before the experts' do, so that the first layer does not wait behind two layers' experts.
        x = self._embed(input_ids)
        for g in range(min(len(groups), len(self.buffers))):
            self._prefetch(g)
        for i, layer in enumerate(self.model.model.layers):
            g = self.group_of.get(i)
            if g is not None and i == groups[g][0]:
                self._wait(g)
            for rows, batch in chunks:
                x[rows] = layer(x[rows], batch)
            if after_layer is not None:
                after_layer(i)
            if g is not None and i == groups[g][-1]:
                self._release(g)
        for rows, _ in chunks:
            x[rows] = self.model.model.norm(x[rows])
        return x

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] on the device -> [T, H] there; a host embedding's rows are gathered into pinned memory."""
        embed = self.model.model.embed_tokens
        if not self.plan.host_embedding:
            return embed(input_ids)
        rows = torch.empty(input_ids.numel(), embed.embedding_dim, dtype=embed.weight.dtype, pin_memory=self.cuda)
        torch.index_select(embed.weight, 0, input_ids.cpu(), out=rows)
        return rows.to(self.device, non_blocking=True)

    def _prefetch(self, g: int) -> None:
        """Copy group g's experts into buffer g % 2, once the group that last used it has finished."""
        offset, buffer = 0, self.buffers[g % len(self.buffers)]
        stream = self.copy_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None and g >= len(self.buffers):
                stream.wait_event(self._done[g - len(self.buffers)])
            for i in self.plan.groups[g]:
                views, offset = buffer_views(buffer, self.experts[i].host_tensors, offset)
                for view, source in zip(views, self.sources[i]):
                    view.copy_(source, non_blocking=stream is not None)
                self.experts[i].bind(views)
            if stream is not None:
                self._ready[g] = stream.record_event()

    def _wait(self, g: int) -> None:
        if self._ready[g] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[g])

    def _release(self, g: int) -> None:
        for i in self.plan.groups[g]:
            self.experts[i].bind(None)  # its buffer is about to be overwritten
        if self.cuda:
            self._done[g] = torch.cuda.current_stream(self.device).record_event()
        if g + len(self.buffers) < len(self.plan.groups):
            self._prefetch(g + len(self.buffers))

    @torch.inference_mode()
    def prefill_prompt(self, prompt_ids: list[int], page_size: int = 16) -> torch.Tensor:
        """One prompt through per-layer KV staging of its own on the device -> final hidden states [T, H] (tests,
        benchmarks); its KV is dropped layer by layer."""
        pages = -(-len(prompt_ids) // page_size)
        kv = layer_staging(self.model.kv_widths, pages * page_size, page_size, self.dtype, self.device,
                           self.model.state_widths, state_slots=1)  # fmt: skip
        seq = PromptSequence(list(prompt_ids), list(range(pages)), state_slot=0)
        input_ids, chunks, _ = chunk_batches([(seq, len(prompt_ids))], kv, self.device, self.plan.chunk_for(len(prompt_ids)))
        return self.forward(input_ids, chunks)


@dataclasses.dataclass
class PromptSequence:
    """The fields forward_batch reads of a Sequence."""

    token_ids: list[int]
    page_table: list[int]
    num_cached: int = 0
    state_slot: int | None = None


def chunk_batches(plan: Plan, kv: KVCache, device, chunk_tokens: int):
    """Split a step's plan into chunks of at most `chunk_tokens` tokens, in token order ->
    (input ids [T], [(rows, ForwardBatch)], the whole step's ForwardBatch). The step's tensors are made once; a
    chunk's batch holds views of its rows and its sequences' slices."""
    input_ids, whole = forward_batch(plan, kv, device)
    if input_ids.numel() <= chunk_tokens:  # the step in one chunk: its batch is the whole step's
        return input_ids, [(slice(0, input_ids.numel()), whole)], whole
    pieces: list[list[tuple]] = [[]]  # each chunk's (sequence, its first position in the chunk, tokens)
    room = chunk_tokens
    for seq, take in plan:
        done = 0
        while done < take:
            if room == 0:
                pieces.append([])
                room = chunk_tokens
            n = min(take - done, room)
            pieces[-1].append((seq, seq.num_cached + done, n))
            done, room = done + n, room - n
    chunks, start = [], 0
    for piece in pieces:
        slices, offset = [], 0
        for seq, begin, n in piece:
            slices.append(SequenceSlice(offset, n, kv.context(seq.page_table, begin + n, device), seq.state_slot))
            offset += n
        rows = slice(start, start + offset)
        chunks.append((rows, ForwardBatch(whole.positions[rows], whole.write_slots[rows], slices, kv)))
        start += offset
    return input_ids, chunks, whole
