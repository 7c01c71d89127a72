"""The gateway's view of the engine: submit a prompt, stream its TokenEvents back, abort, health, stats.

`InProcessEngineClient` drives an `EngineCore` on one thread of this process; the ZeroMQ pipeline
client (GPU prefill worker + CPU decode pool) implements the same `EngineClient` interface.
"""

import asyncio
import contextlib
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from krasis.common.engine import EngineCore, TokenEvent
from krasis.common.sampling_params import SamplingParams
from krasis.gateway.metrics import RateWindow

log = logging.getLogger("krasis.gateway")


class EngineBusy(Exception):
    """Running + waiting sequences are at capacity; the client should retry later."""


class EngineError(Exception):
    """The engine could not run (or finish) a request; the message is meant for the HTTP client."""


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the engine's running batch
    waiting: int  # admitted sequences not yet running (the queue depth)
    kv_pages_in_use: int
    kv_pages_total: int
    prefill_tokens: int  # totals since start
    decode_tokens: int
    prefill_tokens_per_s: float  # over the last few seconds
    decode_tokens_per_s: float


class EngineClient(ABC):
    """What the gateway needs of an engine. Admission is shared: at most `max_running` sequences run
    and `max_waiting` more wait; beyond that `admit` raises EngineBusy (HTTP 429)."""

    def __init__(self, max_running: int, max_waiting: int):
        self.max_running, self.max_waiting = max_running, max_waiting
        self.in_flight = 0  # sequences admitted and not yet done, as seen by the gateway

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    @contextlib.contextmanager
    def admit(self, num_sequences: int) -> Iterator[None]:
        """Hold `num_sequences` slots for the duration of the block; EngineBusy when they are not free."""
        if self.in_flight + num_sequences > self.capacity:
            raise EngineBusy(f"{self.in_flight} of {self.capacity} sequence slots are taken")
        self.in_flight += num_sequences
        try:
            yield
        finally:
            self.in_flight -= num_sequences

    async def start(self) -> None:
        """Called once on the event loop that will call `generate`."""

    async def close(self) -> None:
        """Stop the engine; streams still open end with EngineError."""

    @abstractmethod
    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Events of one sequence until (and including) the one with a finish_reason. Closing the
        iterator early aborts the sequence; a failed request raises EngineError from it."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a sequence and free its KV pages; unknown or finished ids are ignored."""

    @abstractmethod
    def health(self) -> tuple[bool, str]:
        """(whether requests can be served, a one-line reason)."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    async def _events(self, request_id: str, events: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        """A request's queued events up to the finishing one (an EngineError item is raised);
        closed before that, the sequence is aborted. Implementations of `generate` share this."""
        finished = False
        try:
            while not finished:
                item = await events.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.abort(request_id)


class InProcessEngineClient(EngineClient):
    """Runs `engine.step()` on one dedicated thread, fed by a thread-safe command queue; events reach
    each request's asyncio queue through `loop.call_soon_threadsafe`, one call per step."""

    def __init__(self, engine: EngineCore, max_running: int, max_waiting: int):
        super().__init__(max_running, max_waiting)
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: deque[tuple[str, list[int], SamplingParams]] = deque()  # engine thread only
        self._thread = threading.Thread(target=self._run, name="krasis-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: str | None = None
        self._prefill, self._decode = RateWindow(), RateWindow()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def close(self) -> None:
        self._commands.put(("stop",))
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._failure = self._failure or "the server is shutting down"
        self._fail_all(self._failure)

    async def generate(self, request_id, prompt_ids, params) -> AsyncIterator[TokenEvent]:
        if self._failure is not None:
            raise EngineError(self._failure)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, list(prompt_ids), params))
        try:
            async with contextlib.aclosing(self._events(request_id, stream)) as events:
                async for item in events:
                    yield item
        finally:
            del self._streams[request_id]

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def health(self) -> tuple[bool, str]:
        if self._failure is not None:
            return False, self._failure
        if not self._thread.is_alive():
            return False, "the engine thread is not running"
        return True, "ok"

    def stats(self) -> EngineStats:
        kv = self.engine.kv
        return EngineStats(
            running=len(self.engine.running),
            waiting=len(self._pending) + len(self.engine.waiting),
            kv_pages_in_use=kv.num_pages - self.engine.allocator.num_free,
            kv_pages_total=kv.num_pages,
            prefill_tokens=self._prefill.total,
            decode_tokens=self._decode.total,
            prefill_tokens_per_s=self._prefill.rate(),
            decode_tokens_per_s=self._decode.rate(),
        )

    # --- the engine thread ---

    def _run(self) -> None:
        try:
            while self._take_commands(block=not (self.engine.has_work or self._pending)):
                self._feed_engine()
                if self.engine.has_work:
                    self._step()
        except BaseException as exc:  # a dead engine thread must show in /health, not hang requests
            log.exception("engine thread died")
            self._failure = f"the engine stopped: {type(exc).__name__}: {exc}"
            self._call_in_loop(self._fail_all, self._failure)

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on "stop"."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._pending.append(command[1:])
            else:
                self._abort_now(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _abort_now(self, request_id: str) -> None:
        kept = [item for item in self._pending if item[0] != request_id]
        if len(kept) != len(self._pending):
            self._pending = deque(kept)
        self.engine.abort(request_id)

    def _feed_engine(self) -> None:
        """Hand waiting requests to the engine while fewer than max_running are in it."""
        while self._pending and len(self.engine.running) + len(self.engine.waiting) < self.max_running:
            request_id, prompt_ids, params = self._pending.popleft()
            try:
                self.engine.add(request_id, prompt_ids, params)
            except ValueError as exc:
                self._call_in_loop(self._deliver_error, request_id, str(exc))

    def _step(self) -> None:
        seqs = self.engine.running + self.engine.waiting
        before = [(seq.num_cached, len(seq.token_ids)) for seq in seqs]
        try:
            events = self.engine.step()
        except Exception as exc:  # one bad step fails the sequences in it, not the server
            log.exception("engine step failed")
            self._fail_engine_sequences(f"the engine failed: {type(exc).__name__}: {exc}")
            return
        prefill = decode = 0
        for seq, (cached, length) in zip(seqs, before):
            done = seq.num_cached - cached
            if length - cached == 1:
                decode += done
            else:
                prefill += done
        self._prefill.add(prefill)
        self._decode.add(decode)
        if events:
            self._call_in_loop(self._deliver, events)

    def _fail_engine_sequences(self, message: str) -> None:
        for seq in self.engine.running + self.engine.waiting:
            self.engine.abort(seq.request_id)
            self._call_in_loop(self._deliver_error, seq.request_id, message)

    def _call_in_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # --- the event loop ---

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.put_nowait(event)

    def _deliver_error(self, request_id: str, message: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(EngineError(message))

    def _fail_all(self, message: str) -> None:
        for stream in self._streams.values():
            stream.put_nowait(EngineError(message))
