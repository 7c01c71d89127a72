"""The per-layer hand-off among expert-shard workers, through one shared-memory segment (no ZeroMQ per layer).

The leader (shard 0, which also runs attention and routing) publishes a layer's MoE input, x [T, H] in the model
dtype with topk ids and weights [T, K], and bumps a sequence counter. Each follower computes its partial into its
own fp32 slot and sets its done counter to that sequence number. The leader adds the slots to its own partial in
shard order, so the sum never depends on who finished first.

Memory ordering: every counter has a single writer, is an aligned int64 written with one 8-byte store, and is
written after the data it announces. x86-64 (TSO) keeps stores in order, and loads in order too, so a reader that
sees the new counter also sees the data. A weakly ordered CPU (aarch64) would need release/acquire fences here.

Segment (regions 4096-aligned): header | x [max_tokens, H] | topk_ids int64 [max_tokens, K]
| topk_weights fp32 [max_tokens, K] | one fp32 [max_tokens, H] slot per follower (shards 1..W-1).
Header: 64-byte line 0 holds the leader's fields; line i holds shard i's done counter (lines keep writers apart).
"""

import mmap
import os
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

# Shared with the KV pool: segments under /dev/shm that the owner unlinks on close, at exit and on SIGTERM.
from krasis.common.shm_segments import SEGMENT_NAME, SHM_DIR, create_segment, pid_alive, track_owned, unlink_segment

_ALIGN = 4096
_LINE = 8  # int64s per 64-byte cache line
_MAGIC, _SEQ, _TOKENS, _LAYER, _SHUTDOWN = range(5)
_MAGIC_VALUE = 0x6B72_6173_6973_0001  # "krasis" + layout version 1
DEFAULT_TIMEOUT_S = 30.0  # a first step may fault in gigabytes of memory-mapped experts; deaths are seen far sooner


class ShardWorkerDied(RuntimeError):
    """A follower died, or did not answer within the timeout, during a step; `shard` names it."""

    def __init__(self, shard: int, message: str):
        super().__init__(message)
        self.shard = shard


@dataclass(frozen=True)
class WaitPolicy:
    """How a waiter polls a counter.

    Spinning wakes within ~1 us but burns the core; a sleep costs one wake-up (~60-100 us on Linux, whose timer
    slack rounds short sleeps up). Workers pinned to cores of their own can spin through a whole layer's compute
    (~100 us) for free, so the default spins that long and then sleeps, doubling up to `max_sleep_s`: an idle
    follower then polls ~1000 times a second instead of holding a core, and wakes ~1 ms late once.
    """

    spin_s: float = 200e-6
    sleep_s: float = 50e-6
    max_sleep_s: float = 1e-3
    check_every_s: float = 5e-3  # liveness checks cost a /proc read each; a death is seen within this


def poll(is_done: Callable[[], bool], policy: WaitPolicy, timeout_s: float, check: Callable[[], None] = None) -> bool:
    """Wait until is_done(): spin, then sleep with backoff; call check() (which may raise) every check_every_s."""
    now = start = time.perf_counter()
    next_check, sleep = start + policy.check_every_s, policy.sleep_s
    while not is_done():
        now = time.perf_counter()
        if check is not None and now >= next_check:
            check()
            next_check = now + policy.check_every_s
        if now - start >= timeout_s:
            return False
        if now - start >= policy.spin_s:
            time.sleep(sleep)
            sleep = min(2 * sleep, policy.max_sleep_s)
    return True


def pids_alive(pids: dict[int, int]) -> Callable[[int], bool]:
    """A liveness check from {shard: pid}; a zombie counts as dead (its parent may not have reaped it yet)."""
    return lambda shard: pid_alive(pids[shard])


@dataclass(frozen=True)
class ShardExchangeDescriptor:
    """What a follower needs to attach; `asdict()` is msgpack-able, `from_dict` validates what came over the wire."""

    name: str
    num_shards: int
    max_tokens: int
    hidden_size: int
    top_k: int
    dtype: str  # torch dtype name of x: "bfloat16", "float32"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "ShardExchangeDescriptor":
        try:
            sizes = (int(fields[k]) for k in ("num_shards", "max_tokens", "hidden_size", "top_k"))
            d = cls(str(fields["name"]), *sizes, str(fields["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed shard exchange descriptor: {exc!r}") from None
        _check(d)
        return d

    @property
    def offsets(self) -> list[int]:
        """Byte offsets of header, x, topk_ids, topk_weights, each follower's slot, and the end (= segment size)."""
        itemsize = getattr(torch, self.dtype).itemsize
        t, h, k = self.max_tokens, self.hidden_size, self.top_k
        sizes = [_LINE * 8 * self.num_shards, t * h * itemsize, t * k * 8, t * k * 4] + [t * h * 4] * (
            self.num_shards - 1
        )
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // _ALIGN) * _ALIGN)
        return offsets


def _check(d: ShardExchangeDescriptor) -> None:
    if not SEGMENT_NAME.fullmatch(d.name):
        raise ValueError(f"bad shard exchange name {d.name!r}")
    if min(d.num_shards, d.max_tokens, d.hidden_size, d.top_k) < 1:
        raise ValueError(f"shard exchange needs num_shards, max_tokens, hidden_size and top_k >= 1, got {d}")
    if not isinstance(getattr(torch, d.dtype, None), torch.dtype):
        raise ValueError(f"shard exchange dtype {d.dtype!r} is not a torch dtype")


class ShardExchange:
    """One process's mapping of the exchange segment. The leader creates it; followers attach and use `follower()`."""

    def __init__(self, descriptor: ShardExchangeDescriptor, mapping: mmap.mmap, owner_pid: int | None):
        self.descriptor, self._mapping, self._owner_pid = descriptor, mapping, owner_pid
        self.policy = WaitPolicy()
        off, buffer = descriptor.offsets, memoryview(mapping)
        t, h, k = descriptor.max_tokens, descriptor.hidden_size, descriptor.top_k

        def region(i: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
            # A memoryview slice, not the mmap: torch holds it, and its export stops mmap.close() under a live tensor.
            nbytes = int(np.prod(shape)) * dtype.itemsize
            return torch.frombuffer(buffer[off[i] : off[i] + nbytes], dtype=torch.uint8).view(dtype).view(shape)

        self._header = np.frombuffer(buffer[: off[1]], dtype=np.int64)
        self.x = region(1, getattr(torch, descriptor.dtype), (t, h))
        self.topk_ids = region(2, torch.int64, (t, k))
        self.topk_weights = region(3, torch.float32, (t, k))
        self.slots = [region(3 + s, torch.float32, (t, h)) for s in range(1, descriptor.num_shards)]
        self._seq, self._pending_tokens, self.broken = int(self._header[_SEQ]), 0, None

    @classmethod
    def create(cls, num_shards, max_tokens, hidden_size, top_k, dtype, name_prefix="krasis-experts"):
        """A new segment owned by this process (the leader): unlinked on close(), at exit and on SIGTERM."""
        if not SEGMENT_NAME.fullmatch(name_prefix):
            raise ValueError(f"bad shard exchange name prefix {name_prefix!r}")
        name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        d = ShardExchangeDescriptor(name, num_shards, max_tokens, hidden_size, top_k, str(dtype).removeprefix("torch."))
        _check(d)
        track_owned(SHM_DIR / name)
        try:
            mapping = create_segment(SHM_DIR / name, d.offsets[-1], reserve=True)
        except BaseException:
            unlink_segment(SHM_DIR / name)
            raise
        exchange = cls(d, mapping, os.getpid())
        exchange._header[_MAGIC] = _MAGIC_VALUE
        return exchange

    @classmethod
    def attach(cls, descriptor: "ShardExchangeDescriptor | dict") -> "ShardExchange":
        if isinstance(descriptor, dict):
            descriptor = ShardExchangeDescriptor.from_dict(descriptor)
        _check(descriptor)
        fd = os.open(SHM_DIR / descriptor.name, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != descriptor.offsets[-1]:
                raise ValueError(f"shard exchange {descriptor.name}: size does not match its descriptor")
            exchange = cls(descriptor, mmap.mmap(fd, descriptor.offsets[-1]), owner_pid=None)
        finally:
            os.close(fd)
        if exchange._header[_MAGIC] != _MAGIC_VALUE:
            raise ValueError(f"shard exchange {descriptor.name}: not a krasis exchange segment (bad magic)")
        return exchange

    def publish(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Leader: hand layer `layer`'s input to the followers. x: [T, H] in the exchange dtype; topk_*: [T, K]."""
        self._check_step(x, topk_ids, topk_weights)
        tokens = x.shape[0]
        self.x[:tokens].copy_(x)
        self.topk_ids[:tokens].copy_(topk_ids)
        self.topk_weights[:tokens].copy_(topk_weights)  # travel as fp32, as the routers produce them
        self._header[_TOKENS], self._header[_LAYER] = tokens, layer
        self._seq += 1
        self._header[_SEQ] = self._seq  # last: announces everything above
        self._pending_tokens = tokens

    def gather(self, own_partial: torch.Tensor, alive: Callable[[int], bool], timeout_s=DEFAULT_TIMEOUT_S):
        """Leader: wait for every follower, then own_partial + slot 1 + ... + slot W-1 (fp32 [T, H], shard order).

        Raises ShardWorkerDied naming a follower that `alive(shard)` says is gone or that misses `timeout_s`;
        the exchange is then broken, and the pool is rebuilt with a new one.
        """
        if not self._pending_tokens:
            raise RuntimeError("gather() without a published step")
        waiting = list(range(1, self.descriptor.num_shards))

        def all_done() -> bool:
            while waiting and self._header[_LINE * waiting[0]] == self._seq:
                waiting.pop(0)
            return not waiting

        def check() -> None:
            for shard in waiting:
                if not alive(shard):
                    self._fail(shard, f"expert shard {shard} died during layer {self._header[_LAYER]}")

        if not poll(all_done, self.policy, timeout_s, check):
            check()
            self._fail(waiting[0], f"expert shard {waiting[0]} did not finish its partial within {timeout_s} s")
        tokens, self._pending_tokens = self._pending_tokens, 0
        out = own_partial.float().clone()
        for slot in self.slots:
            out += slot[:tokens]
        return out

    def run_layer(self, layer, x, topk_ids, topk_weights, own_shard, alive, timeout_s=DEFAULT_TIMEOUT_S):
        """Leader: publish, compute shard 0's partial meanwhile, gather. -> fp32 [T, H], the whole layer's sum."""
        self.publish(layer, x, topk_ids, topk_weights)
        return self.gather(own_shard.partial(x, topk_ids, topk_weights), alive, timeout_s)

    def follower(self, shard_index: int) -> "ShardFollower":
        return ShardFollower(self, shard_index)

    def _check_step(self, x, topk_ids, topk_weights) -> None:
        d = self.descriptor
        if self.broken:
            raise RuntimeError(f"shard exchange {d.name} is broken ({self.broken}); create a new one")
        if self._pending_tokens:
            raise RuntimeError("publish() before the previous step was gathered")
        if x.dim() != 2 or x.shape[1] != d.hidden_size or x.dtype != getattr(torch, d.dtype):
            raise ValueError(f"x is {x.dtype} {tuple(x.shape)}; this exchange carries {d.dtype} [T, {d.hidden_size}]")
        if not 1 <= x.shape[0] <= d.max_tokens:
            raise ValueError(f"a step of {x.shape[0]} tokens; this exchange holds 1 to {d.max_tokens} tokens a step")
        if tuple(topk_ids.shape) != (x.shape[0], d.top_k) or topk_weights.shape != topk_ids.shape:
            shapes = f"topk_ids {tuple(topk_ids.shape)}, weights {tuple(topk_weights.shape)}"
            raise ValueError(f"{shapes}: both must be [T, {d.top_k}]")

    def _fail(self, shard: int, message: str):
        self.broken, self._pending_tokens = message, 0
        raise ShardWorkerDied(shard, message)

    def close(self) -> None:
        """Detach; the leader also tells followers to stop and unlinks the segment."""
        if self._mapping is None:
            return
        if self._owner_pid == os.getpid():
            self._header[_SHUTDOWN] = 1
            unlink_segment(SHM_DIR / self.descriptor.name)
        self._header = self.x = self.topk_ids = self.topk_weights = self.slots = None
        try:
            self._mapping.close()
        except BufferError:
            pass  # a caller still holds a view; the memory unmaps with the last of them
        self._mapping = None

    def __enter__(self) -> "ShardExchange":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ShardStep:
    """One published layer as a follower sees it: views into the segment, valid until its finish()."""

    seq: int
    layer: int
    x: torch.Tensor  # [T, H]
    topk_ids: torch.Tensor  # [T, K]
    topk_weights: torch.Tensor  # [T, K] fp32


class ShardFollower:
    """Shard `shard_index` (>= 1) of an attached exchange: wait for a step, compute, finish."""

    def __init__(self, exchange: ShardExchange, shard_index: int):
        if not 1 <= shard_index < exchange.descriptor.num_shards:
            raise ValueError(f"follower shard {shard_index} is not in [1, {exchange.descriptor.num_shards})")
        self.exchange, self.shard_index = exchange, shard_index
        self._header, self._slot = exchange._header, exchange.slots[shard_index - 1]
        self._last_seq = int(self._header[_SEQ])  # a step published before we attached is not ours to answer

    def next_step(self, stop=None) -> ShardStep | None:
        """Wait for the next published step; None once the leader closes the exchange or `stop` (an Event) is set."""
        header = self._header

        def ready() -> bool:
            return header[_SEQ] != self._last_seq or header[_SHUTDOWN] != 0 or (stop is not None and stop.is_set())

        poll(ready, self.exchange.policy, float("inf"))
        if header[_SHUTDOWN] != 0 or header[_SEQ] == self._last_seq:
            return None
        seq, tokens, layer = int(header[_SEQ]), int(header[_TOKENS]), int(header[_LAYER])
        ex = self.exchange
        return ShardStep(seq, layer, ex.x[:tokens], ex.topk_ids[:tokens], ex.topk_weights[:tokens])

    def finish(self, step: ShardStep, partial: torch.Tensor) -> None:
        """Write this shard's fp32 [T, H] partial, then its done counter."""
        if tuple(partial.shape) != tuple(step.x.shape):
            raise ValueError(f"partial {tuple(partial.shape)} does not match the step's x {tuple(step.x.shape)}")
        self._slot[: step.x.shape[0]].copy_(partial)
        self._last_seq = step.seq
        self._header[_LINE * self.shard_index] = step.seq  # last: announces the slot

    def serve(self, compute: Callable[[ShardStep], torch.Tensor], stop=None) -> int:
        """Answer steps with compute(step) until the exchange closes or `stop` is set; returns steps served."""
        served = 0
        while (step := self.next_step(stop)) is not None:
            self.finish(step, compute(step))
            served += 1
        return served

