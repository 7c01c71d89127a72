"""The gateway's side of a CPU decode pool on another host (`krasis-ctl serve --remote-workers tcp://...`).

A pool started there by `krasis-ctl worker --gateway tcp://...` sends a JoinRequest to the gateway's tcp PULL
socket; the gateway checks the model, connects to the pool's inbox and answers with the pool geometry (the same
as its own, so page tables and state slots mean the same rows on both hosts). The pool builds its shared KV pool,
loads its weights and sends RemoteReady. From then on the gateway ships each prefilled sequence's KV and state
rows in SequenceKV chunks ahead of its HandOff (shared memory does not cross hosts).

The pool is lost when its connection drops (seen at once), when its heartbeats stop or it stalls (the gateway's
heartbeat limits), or when it does not become ready in time; its requests then end with an error and /health is
503 until a pool joins again. The gateway beats to the pool too, so a pool cut off from it leaves and re-joins.
"""

import asyncio
import logging
import os
import time

from krasis.common.kv_transfer import sequence_kv_chunks
from krasis.common.protocol_pipeline import (
    REMOTE_PROTOCOL_VERSION, HandOff, Heartbeat, JoinReply, JoinRequest, RemoteReady, Shutdown, WorkerRole,
)  # fmt: skip
from krasis.common.zmq_queues import AsyncPeerPushQueue, AsyncPushQueue
from krasis.gateway.heartbeats import HeartbeatMonitor

log = logging.getLogger("krasis.gateway")

BEAT_EVERY_S = 1.0
REPLY_TIMEOUT_S = 5.0
ALREADY_ATTACHED = "this gateway already has a CPU decode pool"


class RemoteHandle:
    """One joined pool, shaped like a WorkerHandle for the heartbeat check and the death path."""

    def __init__(self, join: JoinRequest, inbox: AsyncPeerPushQueue, on_lost):
        self.join, self.inbox, self._on_lost = join, inbox, on_lost
        self.name = f"cpu-decode@{join.host}"
        self.pid: int | None = None  # the leader's, once ready (its heartbeats carry it)
        self.joined_at, self.ready_at = time.monotonic(), None
        self.kill_reason: str | None = None
        self.exitcode = None

    def kill(self, reason: str) -> None:
        self._on_lost(self, reason)


class RemoteDecodePool:
    """At most one joined pool; `handle` is it (None: none), `ready` when it serves."""

    def __init__(self, config, max_running: int, on_ready, on_lost):
        self.config, self.max_running = config, max_running
        self._on_ready, self._on_lost = on_ready, on_lost
        self.handle: RemoteHandle | None = None
        self.heartbeats = HeartbeatMonitor(config.heartbeat_timeout_s, config.stall_timeout_s)
        self.listen_endpoint = config.remote_listen

    @property
    def ready(self) -> bool:
        return self.handle is not None and self.handle.ready_at is not None

    @property
    def inbox(self) -> AsyncPeerPushQueue | None:
        return None if self.handle is None else self.handle.inbox

    def waiting_reason(self) -> str:
        if self.handle is None:
            return f"no CPU decode pool has joined (listening on {self.listen_endpoint})"
        return f"the CPU decode pool {self.handle.name} is loading"

    def watched(self) -> list[RemoteHandle]:
        return [self.handle] if self.ready else []

    # --- joining ---

    async def join(self, msg: JoinRequest) -> None:
        problem = self._refusal(msg)
        inbox = AsyncPeerPushQueue(msg.inbox_endpoint, bind=False)
        if problem is not None:
            log.warning("refused a CPU decode pool from %s: %s", msg.host, problem)
            await _reply_and_close(inbox, self._reply(msg, problem))
            return
        self.handle = handle = RemoteHandle(msg, inbox, self.lose)
        asyncio.get_running_loop().create_task(self._watch_connection(handle))
        log.info("CPU decode pool %s joining (%d shard(s), %d threads)", handle.name, msg.shards, msg.threads)
        try:
            await inbox.put(self._reply(msg, None), timeout=REPLY_TIMEOUT_S)
        except TimeoutError:
            self.lose(handle, f"is not reachable at {msg.inbox_endpoint} (see krasis-ctl worker --advertise-host)")

    def _refusal(self, msg: JoinRequest) -> str | None:
        c = self.config
        if msg.protocol_version != REMOTE_PROTOCOL_VERSION:
            return f"protocol version {msg.protocol_version}, this gateway speaks {REMOTE_PROTOCOL_VERSION}"
        if self.handle is not None:
            return f"{ALREADY_ATTACHED} ({self.handle.name})"
        if msg.model_fingerprint != c.model_fingerprint:
            return f"its model ({msg.model_fingerprint}) is not the gateway's ({c.model_fingerprint})"
        state_widths = list(c.state_widths) or [0] * len(c.kv_widths)
        if msg.kv_widths != list(c.kv_widths) or (msg.state_widths or [0] * len(c.kv_widths)) != state_widths:
            return f"its KV widths {msg.kv_widths} / state widths {msg.state_widths} are not the gateway's"
        if not msg.inbox_endpoint.startswith("tcp://"):
            return f"inbox endpoint {msg.inbox_endpoint!r} is not tcp://"
        return None

    def _reply(self, msg: JoinRequest, refusal: str | None) -> JoinReply:
        c, w = self.config, self.config.weights
        slots = self.max_running if c.has_state else 0
        retry = refusal is not None and refusal.startswith(ALREADY_ATTACHED)
        return JoinReply(msg.worker_id, refusal is None, refusal or "", retry, c.kv_pages, c.page_size, slots,
                         self.max_running, c.max_context, c.kv_dtype, w.dtype, w.quant, w.dense_quant)  # fmt: skip

    def on_remote_ready(self, msg: RemoteReady) -> None:
        handle = self.handle
        if handle is None or msg.worker_id != handle.join.worker_id or handle.ready_at is not None:
            log.warning("ignoring a RemoteReady from a pool that is not joining (%s)", msg.worker_id)
            return
        handle.pid, handle.ready_at = msg.leader_pid, time.monotonic()
        log.info("CPU decode pool %s ready (leader pid %d, %d shard(s))", handle.name, msg.leader_pid, msg.shards)
        self._on_ready(handle)

    def beat(self, msg: Heartbeat) -> None:
        self.heartbeats.beat(msg)

    # --- losing it ---

    def lose(self, handle: RemoteHandle, reason: str) -> None:
        """Forget `handle` (if still current), tell it to leave, close its socket and report it lost."""
        if handle is not self.handle:
            return
        self.handle, handle.kill_reason = None, reason
        log.error("CPU decode pool %s lost: %s", handle.name, reason)
        asyncio.get_running_loop().create_task(_reply_and_close(handle.inbox, Shutdown()))
        self._on_lost(handle, reason)

    async def _watch_connection(self, handle: RemoteHandle) -> None:
        event = await handle.inbox.disconnected()
        self.lose(handle, f"closed its connection ({event})")

    async def watch(self) -> None:
        """Beat to the pool; give up on one that does not become ready in time."""
        while True:
            await asyncio.sleep(BEAT_EVERY_S)
            handle = self.handle
            if handle is None:
                continue
            if handle.ready_at is None and time.monotonic() - handle.joined_at > self.config.ready_timeout_s:
                self.lose(handle, f"did not report ready within {self.config.ready_timeout_s} s")
                continue
            try:
                await handle.inbox.put(Heartbeat(WorkerRole.GATEWAY, 0, os.getpid(), 0, 0.0), timeout=BEAT_EVERY_S)
            except TimeoutError:
                log.warning("CPU decode pool %s is not reading its inbox", handle.name)

    async def close(self) -> None:
        """The gateway stops: tell the pool to leave (it re-joins when a gateway listens again)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            await _reply_and_close(handle.inbox, Shutdown())

    # --- shipping KV ---

    async def ship(self, pool, hand_off: HandOff) -> None:
        """The sequence's KV rows (read from the gateway's pool off the event loop), then its HandOff."""
        inbox, loop = self.inbox, asyncio.get_running_loop()
        chunks = sequence_kv_chunks(pool, hand_off)
        while (chunk := await loop.run_in_executor(None, next, chunks, None)) is not None:
            await inbox.put(chunk)
        await inbox.put(hand_off)


async def _reply_and_close(queue: AsyncPushQueue, msg, timeout_s: float = 1.0) -> None:
    try:
        await queue.put(msg, timeout=timeout_s)
    except Exception:  # noqa: BLE001  (the peer is gone: nothing to tell it)
        pass
    queue.close(linger_s=1.0)
