"""The VRAM plan of GPU prefill: what stays resident, what streams through two buffers, and the memory
set aside for activations and KV staging. Pure arithmetic over byte counts (no torch), so it is tested on
any machine; `krasis.gpu_worker.device_model.measure_weights` supplies the byte counts of a real model."""

from dataclasses import dataclass, field, replace

GiB = 1 << 30
BUFFER_ALIGN = 256  # every tensor inside a streaming buffer starts on this boundary
STAGING_ROW_ALIGN = 256  # KV staging rows are planned in these steps (covers the page rounding of each prompt)
MIN_CHUNK_TOKENS = 256  # the planner halves the prefill chunk down to this before giving up
FUSED_BLOCK_ROWS = 128  # the tallest row block of the fused expert kernels (krasis.common.kernels.gpu.fused_moe)
DEFAULT_STATE_SLOTS = 4  # sequences a prefill step carries state for (models with linear attention)


class VramBudgetError(ValueError):
    """The budget cannot hold even the resident set, the activations and two streaming buffers."""


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: bytes that are always resident (attention, norms, router, shared/dense MLP)
    and the bytes of its routed experts (0 for a dense layer), which may stream."""

    index: int
    resident_bytes: int
    expert_bytes: int


@dataclass(frozen=True)
class ModelWeights:
    other_bytes: int  # embeddings, final norm, lm_head (a tied lm_head counted once)
    layers: tuple[LayerWeights, ...]
    embedding_bytes: int = 0  # of other_bytes, the input embedding that may stay on the host (0: tied to lm_head)
    lm_head_bytes: int = 0  # of other_bytes, an untied lm_head that may stay on the host (prefill needs a few rows)

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(layer.resident_bytes + layer.expert_bytes for layer in self.layers)


@dataclass(frozen=True)
class ActivationShape:
    """What prefill activation memory depends on; bytes are of the run dtype unless said."""

    hidden_size: int
    top_k: int  # routed experts per token (0 for a dense model)
    expert_width: int  # I of one routed expert
    num_heads: int
    attn_bytes_per_context_token: int  # the context as attention reads and expands it (MLA: latent -> K, V)
    layer_kv_bytes_per_token: int  # one token's KV in the widest layer (the per-layer KV staging)
    dtype_bytes: int = 2
    num_experts: int = 0  # routed experts of a layer (their row padding in the fused expert kernels)
    state_bytes_per_seq: int = 0  # fp32 state rows of one sequence over all layers (linear attention)
    attention_block: int = 0  # context tokens attention expands at a time (MLA blockwise on cuDNN); 0: all at once
    query_bucket: int = 0  # cuDNN calls pad a chunk's square to a multiple of this from one earlier (0: no cuDNN)
    expert_scratch_bytes: int = 0  # quantized experts dequantized a block at a time before their GEMMs (0: never)
    dequantize_first_rows: int = 0  # ... for chunks of at least this many routed rows an expert on average
    norm_fp32_copies: bool = True  # the norms make fp32 copies of their rows (torch's ops; the GPU's fused kernel not)

    def chunk_bytes(self, chunk: int, context: int) -> int:
        """Peak transient bytes of one chunk of `chunk` tokens attending over `context` tokens: its layer input,
        norms and residuals, then attention or the routed experts (never both alive at once)."""
        d, h = self.dtype_bytes, self.hidden_size
        io = chunk * h * (4 * d + 8 * self.norm_fp32_copies)  # x rows, norm output, mixer output, residual; fp32 copies
        square = chunk + self.query_bucket  # the chunk's own keys, from the bucket boundary before it
        if self.attention_block:  # the context's cached rows read back; one block (or the square) expanded at a time
            expanded = min(context, max(square, self.attention_block))
            context_bytes = context * self.layer_kv_bytes_per_token + expanded * self.attn_bytes_per_context_token
        else:
            context_bytes = context * self.attn_bytes_per_context_token
        # the square's queries, keys and values copied into zero-padded rows
        square_copies = (square + self.query_bucket) * self.attn_bytes_per_context_token if self.query_bucket else 0
        attention = context_bytes + square_copies + 4 * chunk * self.num_heads * 256 * d
        rows = chunk * self.top_k
        # router scores and ids; the fused expert kernels' padded rows (pair index, expert of each block, the
        # activation h), each pair's output row, the weighted sum; the routing's sort and index temporaries; the
        # scratch of dequantized experts
        padded = rows + min(self.num_experts, rows) * (FUSED_BLOCK_ROWS - 1)
        moe = chunk * self.num_experts * 8 + padded * (self.expert_width * d + 12) + rows * (h * d + 48) + chunk * h * d
        if self.expert_scratch_bytes and rows >= self.dequantize_first_rows * self.num_experts:
            moe += self.expert_scratch_bytes
        return io + max(attention, moe)

    def step_bytes(self, step_tokens: int, chunk: int, state_slots: int) -> int:
        """Bytes held for a whole step: the hidden states of every token, two per-layer KV staging buffers and the
        hand-off's gather block, the batch's index tensors, and the state rows of `state_slots` sequences."""
        rows = -(-step_tokens // STAGING_ROW_ALIGN) * STAGING_ROW_ALIGN  # staging pages round each prompt up
        index = 8 * step_tokens * (4 + step_tokens // chunk)  # ids, positions, slots; each chunk's context slots
        hidden = step_tokens * self.hidden_size * self.dtype_bytes  # [T, H]
        return hidden + 3 * rows * self.layer_kv_bytes_per_token + index + state_slots * self.state_bytes_per_seq


@dataclass(frozen=True)
class VramPlan:
    budget_bytes: int
    resident_bytes: int  # weights always on the device, resident experts included
    buffer_bytes: int  # one streaming buffer (0 when nothing streams)
    num_buffers: int
    activation_bytes: int  # chunk transients + step-long hidden states, per-layer KV staging and state rows
    chunk_tokens: int
    step_tokens: int
    state_slots: int  # sequences whose state rows the device holds (0: the model keeps no per-sequence state)
    host_embedding: bool  # the input embedding stays on the host: its rows are looked up there and copied over
    resident_expert_layers: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]  # streamed layers, in order, one buffer's worth each
    streamed_bytes: int  # bytes crossing PCIe per prefill step
    layer_expert_bytes: dict = field(default_factory=dict, compare=False)
    shape: ActivationShape | None = field(default=None, compare=False)
    host_lm_head: bool = False  # lm_head stays on the host: the rows prefill samples from go there for their logits

    def chunk_for(self, tokens: int) -> int:
        """The chunk for a step of `tokens` tokens: the whole step in one chunk when its transients (chunk and hidden
        states) fit in those the plan holds for its own chunk and longest step, else halved down to the plan's chunk.
        A step shorter than the longest attends over less context, so it can take larger chunks."""
        if self.shape is None or tokens <= self.chunk_tokens:
            return self.chunk_tokens
        row = self.shape.hidden_size * self.shape.dtype_bytes  # one token's hidden state, held for the whole step
        held = self.shape.chunk_bytes(self.chunk_tokens, self.step_tokens) + self.step_tokens * row
        chunk = tokens
        while chunk > self.chunk_tokens and self.shape.chunk_bytes(chunk, tokens) + tokens * row > held:
            chunk = max(self.chunk_tokens, chunk // 2)
        return chunk

    @property
    def expert_scratch_bytes(self) -> int:
        """The scratch routed experts may be dequantized into ahead of their GEMMs (0: they never are)."""
        return self.shape.expert_scratch_bytes if self.shape is not None else 0

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.num_buffers * self.buffer_bytes + self.activation_bytes

    @property
    def streams(self) -> bool:
        return bool(self.groups)

    def describe(self) -> str:
        scratch = self.expert_scratch_bytes
        lines = [
            f"VRAM plan: budget {self.budget_bytes / GiB:.2f} GiB, planned {self.total_bytes / GiB:.2f} GiB",
            f"  resident weights {self.resident_bytes / GiB:.2f} GiB "
            f"(routed experts of {len(self.resident_expert_layers)} layers: {_ranges(self.resident_expert_layers)}"
            f"{'; input embedding on the host' if self.host_embedding else ''}"
            f"{'; lm_head on the host' if self.host_lm_head else ''})",
            f"  activations {self.activation_bytes / GiB:.2f} GiB "
            f"(chunks of {self.chunk_tokens} tokens, up to {self.step_tokens} tokens a step, KV staged one layer "
            f"at a time{f', state rows of {self.state_slots} sequences' if self.state_slots else ''}"
            f"{f'; routed experts dequantized {scratch >> 20} MiB at a time' if scratch else ''})",
        ]
        if self.streams:
            streamed = [i for g in self.groups for i in g]
            lines.append(
                f"  streaming {len(streamed)} layers' experts ({_ranges(streamed)}) in {len(self.groups)} groups "
                f"through {self.num_buffers} x {self.buffer_bytes / GiB:.2f} GiB buffers: "
                f"{self.streamed_bytes / GiB:.2f} GiB over PCIe per prefill step"
            )
        else:
            lines.append("  everything resident: nothing streams")
        return "\n".join(lines)


def _ranges(indices) -> str:
    indices, parts = sorted(indices), []
    for i in indices:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts) or "none"


def _aligned(n: int) -> int:
    return -(-n // BUFFER_ALIGN) * BUFFER_ALIGN


def plan_vram(
    weights: ModelWeights, shape: ActivationShape, budget_bytes: int, chunk_tokens: int, step_tokens: int,
    group_layers: int = 1, slack_bytes: int | None = None, state_slots: int = DEFAULT_STATE_SLOTS,
) -> VramPlan:  # fmt: skip
    """The plan with the largest prefill chunk up to `chunk_tokens` (halved down to MIN_CHUNK_TOKENS) that fits;
    see `plan_for_chunk`. `slack_bytes` (default 64 MiB + 4% of the budget) is kept free for the allocator's
    rounding and fragmentation."""
    if chunk_tokens < 1 or step_tokens < 1 or group_layers < 1:
        raise ValueError(f"chunk_tokens {chunk_tokens}, step_tokens {step_tokens}, group_layers {group_layers} must be >= 1")
    slack = (64 << 20) + budget_bytes // 25 if slack_bytes is None else slack_bytes
    state_slots = state_slots if shape.state_bytes_per_seq else 0
    chunk = min(chunk_tokens, step_tokens)
    # a smaller chunk costs GEMM efficiency on every layer; the host embedding costs a lookup of the step's rows
    # (~4 ms for 32K tokens), the host lm_head the logits of a few rows on the CPU: both go to the host before the
    # chunk shrinks; so does the scratch of dequantizing experts first (they are then dequantized in the GEMM tiles,
    # at about half the speed). The embedding also goes when that keeps more experts resident: each streamed layer's
    # experts cost every prompt a copy (~5 ms on V2-Lite), the time of prompts up to ~8K tokens, which PCIe bounds.
    embedding = [(False, False), (True, False)] if weights.embedding_bytes else [(False, False)]
    lm_head = [(bool(weights.embedding_bytes), True)] if weights.lm_head_bytes else []
    shapes = [shape, replace(shape, expert_scratch_bytes=0)] if shape.expert_scratch_bytes else [shape]
    while True:
        for chunk_shape in shapes:
            for choices in (embedding, lm_head):
                plans = []
                for host_embedding, host_lm_head in choices:
                    try:
                        plans.append(plan_for_chunk(weights, chunk_shape, budget_bytes, chunk, step_tokens,
                                                    group_layers, slack, state_slots, host_embedding, host_lm_head))
                    except VramBudgetError as exc:
                        error = exc
                if plans:  # the fewest streamed bytes; of equals, the first (the embedding on the device)
                    return min(plans, key=lambda p: p.streamed_bytes)
        if chunk <= MIN_CHUNK_TOKENS:
            raise error
        chunk = max(MIN_CHUNK_TOKENS, chunk // 2)


def plan_for_chunk(
    weights: ModelWeights, shape: ActivationShape, budget_bytes: int, chunk_tokens: int, step_tokens: int,
    group_layers: int, slack: int, state_slots: int, host_embedding: bool = False, host_lm_head: bool = False,
) -> VramPlan:  # fmt: skip
    """Everything resident if it fits; else the experts of the earliest MoE layers resident (their compute hides
    the first transfer) and the rest streaming in groups of `group_layers` layers through two buffers."""
    activations = shape.chunk_bytes(chunk_tokens, step_tokens) + shape.step_bytes(step_tokens, chunk_tokens, state_slots)
    other = weights.other_bytes - weights.embedding_bytes * host_embedding - weights.lm_head_bytes * host_lm_head
    fixed = other + sum(layer.resident_bytes for layer in weights.layers) + activations
    moe = [layer for layer in weights.layers if layer.expert_bytes > 0]
    expert_bytes = {layer.index: _aligned(layer.expert_bytes) for layer in moe}
    for resident in range(len(moe), -1, -1):  # most resident first
        streamed = moe[resident:]
        groups = [tuple(l.index for l in streamed[i : i + group_layers]) for i in range(0, len(streamed), group_layers)]
        buffer = max((sum(expert_bytes[i] for i in g) for g in groups), default=0)
        buffers = min(2, len(groups))
        kept = sum(expert_bytes[l.index] for l in moe[:resident])
        if fixed + kept + buffers * buffer + slack <= budget_bytes:
            return VramPlan(
                budget_bytes, fixed - activations + kept, buffer, buffers, activations, chunk_tokens, step_tokens,
                state_slots, host_embedding, tuple(l.index for l in moe[:resident]), tuple(groups),
                sum(l.expert_bytes for l in streamed), {l.index: l.expert_bytes for l in moe}, shape, host_lm_head,
            )  # fmt: skip
    need = fixed + 2 * max(expert_bytes.values(), default=0) * group_layers + slack
    raise VramBudgetError(
        f"VRAM budget {budget_bytes / GiB:.2f} GiB is too small: resident weights "
        f"{(fixed - activations) / GiB:.2f} GiB + activations {activations / GiB:.2f} GiB (chunks of {chunk_tokens}, "
        f"{step_tokens} tokens a step) + two streaming buffers + {slack / GiB:.2f} GiB allocator slack need "
        f"{need / GiB:.2f} GiB; raise --vram-budget, or lower the prefill step tokens (the longest prompt)"
    )
