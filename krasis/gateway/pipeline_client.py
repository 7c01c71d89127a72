"""The EngineClient of the multi-process pipeline: a GPU prefill worker and a CPU decode pool over ZeroMQ.

The gateway owns the shared KV pool and its PageAllocator. A request's pages are reserved (prompt + max_tokens)
when it is sent to prefill and freed when its final event arrives, or, after an abort, once every worker that
may hold it confirmed (each answers an AbortRequest with a TokenOut carrying FinishReason.ABORT), so pages are
never reused while a worker may still write them. A dead worker (seen by the Supervisor) fails every in-flight
request; /health is 503 until it (for a decode worker, the whole pool) is restarted and ready.

With `remote_listen` the decode pool runs on another host and joins over tcp (gateway.remote_pool): hand-offs
then come to the gateway, which ships each sequence's KV ahead of it; a lost pool fails every in-flight request
and /health is 503 until a pool joins again.
"""

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from krasis.common.engine import TokenEvent
from krasis.common.kv_cache import PageAllocator
from krasis.common.protocol import FinishReason
from krasis.common.protocol_pipeline import (
    AbortRequest, AddRequest, HandOff, Heartbeat, JoinRequest, RemoteReady, RequestFailed, TokenBatch, TokenOut,
)  # fmt: skip
from krasis.common.sampling_params import SamplingParams
from krasis.gateway.engine_client import EngineClient, EngineError, EngineStats
from krasis.gateway.heartbeats import HeartbeatMonitor, watch_heartbeats
from krasis.gateway.worker_groups import DECODE, PREFILL, PipelineConfig, WorkerGroups  # noqa: F401 (PipelineConfig re-exported)
from krasis.gateway.metrics import RateWindow
from krasis.gateway.remote_pool import RemoteDecodePool

log = logging.getLogger("krasis.gateway")

RESTART_ATTEMPTS = 3


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: asyncio.Queue = field(default_factory=asyncio.Queue)
    pages: list[int] | None = None  # None until sent to prefill
    state_slot: int | None = None  # its row of the pool's per-sequence state, while it holds pages (state models)
    next_index: int = 0
    early: dict[int, TokenOut] = field(default_factory=dict)  # tokens that overtook an earlier one
    aborted: bool = False
    awaiting: set[str] = field(default_factory=set)  # roles whose abort confirmation is still due


class PipelineEngineClient(EngineClient):
    """Routes requests to the worker processes and their tokens back; see the module docstring."""

    def __init__(self, config: PipelineConfig, max_running: int, max_waiting: int):
        super().__init__(max_running, max_waiting)
        self.config = config
        self.allocator = PageAllocator(config.kv_pages)
        # one state row per dispatched request: at most max_running hold pages at once
        self.state_slots = PageAllocator(max_running) if config.has_state else None
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._dispatched = 0
        self._outboxes: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._failure: str | None = "starting"
        self._closing = False
        self._prefill_rate, self._decode_rate = RateWindow(), RateWindow()
        self._run_dir = tempfile.mkdtemp(prefix="krasis-")
        self.workers = WorkerGroups(config, self._run_dir, max_running)
        self.heartbeats = HeartbeatMonitor(config.heartbeat_timeout_s, config.stall_timeout_s)
        self.remote = None
        if config.remote_listen is not None:
            self.remote = RemoteDecodePool(config, max_running, self._on_remote_ready, self._on_remote_lost)

    # --- lifecycle ---

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._outboxes = {PREFILL: asyncio.Queue(), DECODE: asyncio.Queue()}
        try:
            self.workers.open(lambda handle: loop.call_soon_threadsafe(self._on_death, handle))
            await loop.run_in_executor(None, self.workers.wait_ready, None)
        except BaseException:
            await loop.run_in_executor(None, self.workers.close)
            self.workers.close_sockets()
            shutil.rmtree(self._run_dir, ignore_errors=True)
            raise
        self._tasks = [
            asyncio.create_task(self._read(self.workers.prefill_tokens, PREFILL)),
            asyncio.create_task(self._read(self.workers.decode_tokens, DECODE)),
            asyncio.create_task(self._send_outbox(PREFILL)),
            asyncio.create_task(self._send_outbox(DECODE)),
            asyncio.create_task(watch_heartbeats(self.heartbeats, self._local_workers)),
        ]
        if self.remote is not None:
            self._tasks += [
                asyncio.create_task(self._route_hand_offs()),
                asyncio.create_task(self.remote.watch()),
                asyncio.create_task(watch_heartbeats(self.remote.heartbeats, self.remote.watched)),
            ]
        self.workers.supervisor.start()
        self._failure = self._missing_pool()

    async def close(self) -> None:
        self._closing = True
        self._failure = "the server is shutting down"
        self._fail_all(self._failure)
        for task in self._tasks:
            task.cancel()
        if self.remote is not None:
            await self.remote.close()
        await asyncio.get_running_loop().run_in_executor(None, self.workers.close)
        self.workers.close_sockets()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def _local_workers(self) -> list:
        return [h for role, group in self.workers.handles.items() if role not in self.workers.restarting for h in group]

    def _missing_pool(self) -> str | None:
        """Why requests cannot run without a worker restart: a remote decode pool not (yet) joined and ready."""
        return None if self.remote is None or self.remote.ready else self.remote.waiting_reason()

    def health(self) -> tuple[bool, str]:
        return (False, self._failure) if self._failure is not None else (True, "ok")

    def stats(self) -> EngineStats:
        total = self.config.kv_pages
        return EngineStats(
            running=self._dispatched, waiting=len(self._waiting),
            kv_pages_in_use=total - self.allocator.num_free, kv_pages_total=total,
            prefill_tokens=self._prefill_rate.total, decode_tokens=self._decode_rate.total,
            prefill_tokens_per_s=self._prefill_rate.rate(), decode_tokens_per_s=self._decode_rate.rate(),
        )  # fmt: skip

    # --- requests ---

    async def generate(self, request_id, prompt_ids, params) -> AsyncIterator[TokenEvent]:
        if self._failure is not None:
            raise EngineError(self._failure)
        if params.seed is None:  # prefill and decode must draw from one stream
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        request = _Request(request_id, list(prompt_ids), params)
        self._requests[request_id] = request
        self._waiting.append(request)
        self._dispatch_waiting()
        async with contextlib.aclosing(self._events(request_id, request.stream)) as events:
            async for item in events:
                yield item

    def abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None or request.aborted:
            return
        if request.pages is None:  # still waiting here: no worker has seen it
            self._waiting.remove(request)
            del self._requests[request_id]
            return
        request.aborted, request.awaiting = True, {PREFILL, DECODE}
        self._send(PREFILL, AbortRequest(request_id))
        self._send(DECODE, AbortRequest(request_id))

    def _dispatch_waiting(self) -> None:
        """Send waiting requests to prefill, in order, while a decode slot and their page reservation are free."""
        while self._waiting and self._dispatched < self.max_running:
            request = self._waiting[0]
            pages = self._pages_needed(request)
            if pages > self.allocator.num_free:
                return
            self._waiting.popleft()
            request.pages = self.allocator.allocate(pages)
            if self.state_slots is not None:
                request.state_slot = self.state_slots.allocate(1)[0]
            self._dispatched += 1
            add = AddRequest(request.request_id, request.prompt_ids, request.params, request.pages, request.state_slot)
            self._send(PREFILL, add)

    def _pages_needed(self, request: _Request) -> int:
        tokens = min(len(request.prompt_ids) + request.params.max_tokens, self.config.max_context)
        return max(1, -(-tokens // self.config.page_size))

    def _release(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        if request.pages is not None:
            self.allocator.free(request.pages)
            request.pages = None
            if request.state_slot is not None:
                self.state_slots.free([request.state_slot])
                request.state_slot = None
            self._dispatched -= 1
        self._dispatch_waiting()

    # --- messages from the workers ---

    async def _read(self, queue, role: str) -> None:
        while True:
            msg = await queue.get()
            try:
                if isinstance(msg, TokenBatch):
                    for event in msg.events:
                        self._on_token(role, event)
                elif isinstance(msg, RequestFailed):
                    self._on_failed(msg)
                elif isinstance(msg, Heartbeat):
                    (self.heartbeats if self.remote is None or role == PREFILL else self.remote).beat(msg)
                elif isinstance(msg, JoinRequest) and self.remote is not None:
                    await self.remote.join(msg)
                elif isinstance(msg, RemoteReady) and self.remote is not None:
                    self.remote.on_remote_ready(msg)
            except Exception:  # a bug here must not stop every stream
                log.exception("handling a %s from the %s worker failed", type(msg).__name__, role)

    def _on_token(self, role: str, event: TokenOut) -> None:
        request = self._requests.get(event.request_id)
        if request is None:
            return
        if event.finish_reason == FinishReason.ABORT and event.token_id is None:
            request.awaiting.discard(role)
            if request.aborted and not request.awaiting:
                self._release(request)
            return
        if request.aborted:
            return
        request.early[event.index] = event
        while request.next_index in request.early:
            self._deliver(request, request.early.pop(request.next_index))

    def _deliver(self, request: _Request, event: TokenOut) -> None:
        if event.token_id is not None:
            request.next_index += 1
            rate = self._prefill_rate if event.index == 0 else self._decode_rate
            rate.add(len(request.prompt_ids) if event.index == 0 else 1)
        request.stream.put_nowait(TokenEvent(event.request_id, event.token_id, event.finish_reason, event.logprobs))
        if event.finish_reason is not None:
            self._release(request)

    def _on_failed(self, msg: RequestFailed) -> None:
        request = self._requests.get(msg.request_id)
        if request is None:
            return
        # The worker dropped it; abort the other one too before the pages are reused.
        if not request.aborted:
            request.stream.put_nowait(EngineError(msg.message))
            request.aborted, request.awaiting = True, {PREFILL, DECODE}
            self._send(PREFILL, AbortRequest(msg.request_id))
            self._send(DECODE, AbortRequest(msg.request_id))

    # --- sending, in order, from one task ---

    def _send(self, role: str, msg) -> None:
        self._outboxes[role].put_nowait(msg)

    async def _send_outbox(self, role: str) -> None:
        """One task per destination keeps its messages in order; a slow KV shipment holds back only its pool."""
        while True:
            msg = await self._outboxes[role].get()
            queue = self.workers.prefill_requests if role == PREFILL else self._decode_inbox()
            if queue is None:
                continue  # no decode pool: the requests it would concern were failed when it went
            try:
                if isinstance(msg, HandOff):
                    await self.remote.ship(self.workers.pool, msg)
                else:
                    await queue.put(msg)
            except Exception as exc:  # an unencodable message fails its request, not the sender
                log.exception("sending %s to the %s worker failed", type(msg).__name__, role)
                request = self._requests.get(getattr(msg, "request_id", None))
                if request is not None and not request.aborted:
                    request.stream.put_nowait(EngineError(f"could not send the request: {exc}"))

    def _decode_inbox(self):
        return self.workers.decode_inbox if self.remote is None else self.remote.inbox

    async def _route_hand_offs(self) -> None:
        """With a remote pool, the prefill worker's hand-offs come here; live ones go to the pool with their KV."""
        while True:
            msg = await self.workers.hand_offs.get()
            if not isinstance(msg, HandOff):
                continue
            request = self._requests.get(msg.request_id)
            if request is not None and not request.aborted and self.remote.ready:
                self._send(DECODE, msg)

    # --- a remote decode pool joining and going ---

    def _on_remote_ready(self, handle) -> None:
        if not self.workers.restarting and not self._closing:
            self._failure = None

    def _on_remote_lost(self, handle, reason: str) -> None:
        if self._closing:
            return
        message = f"CPU decode pool {handle.name} {reason}"
        self._failure = f"{message}; {self.remote.waiting_reason()}"
        self._fail_all(message)
        # Its pool's pages are on its host: nothing here waits for its abort confirmations.
        for request in list(self._requests.values()):
            request.awaiting.discard(DECODE)
            if request.aborted and not request.awaiting:
                self._release(request)

    # --- worker deaths ---

    def _on_death(self, handle) -> None:
        if self._closing:
            return
        role = self.workers.role_of(handle)
        if role is None or role in self.workers.restarting:
            return
        ended = handle.kill_reason or f"died with exit code {handle.exitcode}"
        message = f"worker {handle.name} (pid {handle.pid}) {ended}"
        self._failure = f"{message}; restarting it"
        self._fail_all(message)
        self.workers.restarting.add(role)
        asyncio.get_running_loop().create_task(self._restart(role))

    def _fail_all(self, message: str) -> None:
        """End every request with EngineError; dispatched ones are aborted and freed once both workers confirm."""
        for request in list(self._requests.values()):
            if not request.aborted:
                request.stream.put_nowait(EngineError(message))
            if request.pages is None:
                self._waiting.remove(request)
                del self._requests[request.request_id]
            elif not request.aborted:
                request.aborted, request.awaiting = True, {PREFILL, DECODE}
                self._send(PREFILL, AbortRequest(request.request_id))
                self._send(DECODE, AbortRequest(request.request_id))

    async def _restart(self, role: str) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            try:
                await loop.run_in_executor(None, self.workers.stop_group, role)
                self.workers.start_group(role)  # spawned from the loop's thread: PDEATHSIG follows the spawner
                await loop.run_in_executor(None, self.workers.wait_ready, role)
                break
            except Exception as exc:
                log.exception("restarting the %s worker(s) failed (attempt %d)", role, attempt)
                self._failure = f"restarting the {role} worker(s) failed: {exc}"
                if self._closing or attempt == RESTART_ATTEMPTS:
                    return  # /health stays 503 with the reason
        self.workers.restarting.discard(role)
        # The new workers never saw the aborts the dead ones missed: their confirmations are still due.
        for request in self._requests.values():
            if request.aborted and role in request.awaiting:
                self._send(role, AbortRequest(request.request_id))
        if not self.workers.restarting:
            self._failure = self._missing_pool()
            log.info("the %s worker(s) restarted; serving again", role)
