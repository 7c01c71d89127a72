"""Messages of the serving pipeline (gateway, GPU prefill worker, CPU decode pool, supervisor), by channel.

Types only (STYLE.md rule 1). `krasis.common.wire` turns them into msgpack frames and back, checking every
field against the annotations here: keep annotations to int, float, bool, str, IntEnum, torch.Tensor,
list[X], tuple[X, ...], X | None and nested dataclasses. Fields travel by position: append, don't reorder.
"""

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch

from krasis.common.protocol import FinishReason
from krasis.common.sampling import TokenLogprobs
from krasis.common.sampling_params import SamplingParams


class MessageType(enum.IntEnum):
    """The wire tag of each message: the first element of its msgpack array."""

    ADD_REQUEST = 1
    ABORT_REQUEST = 2
    HAND_OFF = 3
    TOKEN_BATCH = 4
    REQUEST_FAILED = 5
    # 6, 7: retired (the ready handshake travels on the spawn pipe, see krasis.common.process)
    HEARTBEAT = 8
    SHUTDOWN = 9
    JOIN_REQUEST = 10
    JOIN_REPLY = 11
    REMOTE_READY = 12
    SEQUENCE_KV = 13


class WorkerRole(enum.IntEnum):
    """Which kind of worker a process is; str() is the name used in process titles."""

    GPU_PREFILL = 1
    CPU_DECODE = 2
    GATEWAY = 3  # the gateway's beat to a decode pool on another host

    def __str__(self) -> str:
        return {WorkerRole.GPU_PREFILL: "gpu-prefill", WorkerRole.CPU_DECODE: "cpu-decode",
                WorkerRole.GATEWAY: "gateway"}[self]  # fmt: skip


# --- gateway -> GPU prefill worker (AbortRequest also gateway -> CPU decode pool) ---


@dataclass(frozen=True)
class AddRequest:
    """Prefill a prompt into the KV pages the gateway reserved (prompt + max_tokens), then hand it to decode.

    `sampling.seed` is resolved by the gateway (never None) so prefill and decode draw from the same stream.
    `state_slot`: the sequence's row of the pool's per-sequence state (models with linear-attention layers), else None.
    """

    TAG: ClassVar[MessageType] = MessageType.ADD_REQUEST
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    page_table: list[int]
    state_slot: int | None = None


@dataclass(frozen=True)
class AbortRequest:
    """Stop a sequence wherever it is and forget it (the gateway frees its pages); unknown ids are ignored."""

    TAG: ClassVar[MessageType] = MessageType.ABORT_REQUEST
    request_id: str


# --- GPU prefill worker -> CPU decode pool ---


@dataclass(frozen=True)
class HandOff:
    """A prefilled sequence joins the decode batch: KV of all tokens but the last is in `page_table`.

    token_ids = prompt + the first sampled token (already streamed to the gateway by the prefill worker),
    which with `sampling` (seed resolved) is all a `SequenceSampler` needs to continue the same stream.
    kv_layers: per attention layer [len(token_ids) - 1, width], for a decode core without the prefill worker's
    pool (in-process use); empty in the pipeline, where a pool on another host gets the KV in SequenceKV chunks
    first. state_slot: as in AddRequest; the state after the prompt is in that row of the pool.
    """

    TAG: ClassVar[MessageType] = MessageType.HAND_OFF
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    page_table: list[int]
    sampling: SamplingParams
    kv_layers: list[torch.Tensor]
    state_slot: int | None = None


# --- GPU prefill worker and CPU decode pool -> gateway ---


@dataclass(frozen=True)
class TokenOut:
    """One entry of a TokenBatch: the engine's TokenEvent plus its position in the output.

    `index` (0-based output position; the token count so far for an end without a token) lets the gateway
    put the prefill worker's first token before the decode pool's next ones: they come over different pipes.
    """

    request_id: str
    index: int
    token_id: int | None  # None: the sequence ended without a token (EOS is not emitted)
    finish_reason: FinishReason | None
    logprobs: TokenLogprobs | None


@dataclass(frozen=True)
class TokenBatch:
    """Every token a worker produced in one step, in one message."""

    TAG: ClassVar[MessageType] = MessageType.TOKEN_BATCH
    events: list[TokenOut]


@dataclass(frozen=True)
class RequestFailed:
    """One request could not run on a worker (bad prompt, out of KV pages...); it alone ends, with `message`."""

    TAG: ClassVar[MessageType] = MessageType.REQUEST_FAILED
    request_id: str
    message: str


# --- every worker -> gateway (on its tokens channel) ---


@dataclass(frozen=True)
class Heartbeat:
    """Sent every second by a worker's heartbeat thread (krasis.common.heartbeat) while its process runs.

    steps: pieces of work its loop finished; busy_s: how long the loop has been in the current one (0 if idle).
    """

    TAG: ClassVar[MessageType] = MessageType.HEARTBEAT
    role: WorkerRole
    index: int
    pid: int
    steps: int
    busy_s: float


# --- gateway <-> a CPU decode pool on another host (`krasis-ctl worker --gateway tcp://...`) ---

REMOTE_PROTOCOL_VERSION = 1  # in JoinRequest: bump when these messages change


@dataclass(frozen=True)
class JoinRequest:
    """A decode pool on another host asks to serve a gateway; the reply goes to `inbox_endpoint` (its PULL).

    worker_id: random, one per attempt (a re-join is a new pool). model_fingerprint: of the model's config.json
    (krasis.common.model_fingerprint); kv_widths / state_widths: per layer, as the model computes them.
    """

    TAG: ClassVar[MessageType] = MessageType.JOIN_REQUEST
    protocol_version: int
    worker_id: str
    host: str
    inbox_endpoint: str
    model_fingerprint: str
    kv_widths: list[int]
    state_widths: list[int]
    shards: int
    threads: int


@dataclass(frozen=True)
class JoinReply:
    """The gateway's answer: refused with `message`, or the pool to build (same geometry as the gateway's, so
    page tables and state slots mean the same pages on both hosts) and how to load the weights."""

    TAG: ClassVar[MessageType] = MessageType.JOIN_REPLY
    worker_id: str
    accepted: bool
    message: str
    retry: bool  # refused for now (another pool is attached), not for good (another model)
    num_pages: int
    page_size: int
    num_state_slots: int
    max_running: int
    max_context: int
    kv_dtype: str
    dtype: str
    quant: str
    dense_quant: str


@dataclass(frozen=True)
class RemoteReady:
    """The joined pool loaded its weights and serves; heartbeats carry `leader_pid` from now on."""

    TAG: ClassVar[MessageType] = MessageType.REMOTE_READY
    worker_id: str
    leader_pid: int
    shards: int
    threads: int


@dataclass(frozen=True)
class SequenceKV:
    """Rows [start, start + rows) of a prefilled sequence's KV, for a pool on another host (no shared memory
    across hosts); sent before its HandOff, in chunks of bounded size. The last chunk also carries the state
    rows of linear-attention layers (`states`, fp32 [width] per layer; empty in other chunks).

    kv_layers: per layer [rows, width] in the pool's dtype (width 0 for layers without KV).
    """

    TAG: ClassVar[MessageType] = MessageType.SEQUENCE_KV
    request_id: str
    page_table: list[int]
    start: int
    kv_layers: list[torch.Tensor]
    state_slot: int | None
    states: list[torch.Tensor]


# --- supervisor -> worker ---


@dataclass(frozen=True)
class Shutdown:
    """Stop taking work, release shared memory and exit (to a pool on another host: leave, then re-join)."""

    TAG: ClassVar[MessageType] = MessageType.SHUTDOWN


MESSAGES = (
    AddRequest, AbortRequest, HandOff, TokenBatch, RequestFailed, Heartbeat, Shutdown, JoinRequest, JoinReply,
    RemoteReady, SequenceKV,
)  # fmt: skip
Message = (
    AddRequest | AbortRequest | HandOff | TokenBatch | RequestFailed | Heartbeat | Shutdown | JoinRequest | JoinReply
    | RemoteReady | SequenceKV
)
