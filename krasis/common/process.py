"""Worker processes: spawn with a title, a ready handshake, parent-death detection, clean stop, supervision."""

import atexit
import gc
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import connection
from typing import Callable

import msgpack

from krasis.common.process_title import prctl, set_process_title

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_READY_BYTES = 1 << 20
_MAX_ERROR_CHARS = 2000
_ORPHAN_GRACE_S = 10.0  # after the parent dies, time to stop cleanly before the watchdog forces exit


class WorkerStartError(RuntimeError):
    """A worker died, failed or timed out before reporting ready."""


@dataclass(frozen=True)
class WorkerSpec:
    """How to (re)start a worker: `target(ctx, *args)`, a module-level function; args travel by spawn's pickle."""

    target: Callable
    name: str
    title: str
    args: tuple = ()


class WorkerContext:
    """What a worker's target gets: its identity, the `stop` Event its loop checks, and `ready()`."""

    def __init__(self, spec: WorkerSpec, stop: threading.Event, parent_pid: int, ready_conn):
        self.name, self.title, self.stop, self.parent_pid = spec.name, spec.title, stop, parent_pid
        self._ready_conn = ready_conn
        self.is_ready = False

    def ready(self, capacity: dict) -> None:
        """Tell the parent this worker serves now; `capacity` is a msgpack-able dict (slots, memory, threads...).
        What the worker loaded is frozen out of the garbage collector's scans first (freeze_loaded_objects)."""
        freeze_loaded_objects()
        self._send({"name": self.name, "title": self.title, "pid": os.getpid(), "capacity": capacity})
        self.is_ready = True

    def _send(self, message: dict) -> None:
        self._ready_conn.send_bytes(msgpack.packb(message))


class StopSignals:
    """Turns SIGTERM, SIGINT and the parent's death into `stop.set()`, from a watchdog thread.

    The handler only writes a byte to a pipe: setting a threading.Event inside a signal handler can deadlock
    when the signal lands while the main thread holds that Event's lock (inside `stop.wait()`).
    """

    def __init__(self, stop: threading.Event, parent_pid: int, poll_s: float = 0.5, orphan_grace_s=_ORPHAN_GRACE_S):
        self.stop, self.parent_pid, self.poll_s, self.orphan_grace_s = stop, parent_pid, poll_s, orphan_grace_s
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def install_handlers(self) -> None:
        """Main thread only (Python's rule for signal handlers)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def start_watchdog(self) -> None:
        threading.Thread(target=self._watch, name="krasis-stop-watchdog", daemon=True).start()

    def _on_signal(self, signum, frame) -> None:
        try:
            os.write(self._wake_w, bytes([signum]))
        except BlockingIOError:
            pass  # the pipe is full of earlier wake-ups; one is enough

    def _watch(self) -> None:
        orphaned_at = None
        while True:
            readable, _, _ = select.select([self._wake_r], [], [], self.poll_s)
            if readable:
                os.read(self._wake_r, 64)
                self.stop.set()
            if os.getppid() != self.parent_pid:  # re-parented: the fallback for a missed PDEATHSIG
                self.stop.set()
                orphaned_at = orphaned_at or time.monotonic()
                if self.orphan_grace_s is not None and time.monotonic() - orphaned_at > self.orphan_grace_s:
                    os._exit(1)


def freeze_loaded_objects() -> None:
    """Collect once, then exempt every object alive now (the loaded model's modules and tensors, imported modules)
    from the cyclic garbage collector: its full collections, which otherwise walk all of them, then scan only what
    serving allocates (the bench's DeepSeek-V2-Lite process: 141 ms a full collection before, ~0 after), and can no
    longer stop a prefill or decode step for that long."""
    gc.collect()
    gc.freeze()


def set_torch_threads(threads: int) -> None:
    """`threads` intra-op threads and a single inter-op thread (no process here runs ops in parallel tasks).

    Every pipeline process sets its own count rather than torch's default of one per host core: where the
    processes' threads outnumber the cores, a preempted thread stalls each parallel region of a decode step
    (on 2 cores, ops of microseconds took milliseconds; see docs/BENCHMARKS.md).
    """
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set, or inter-op work already ran in this process: the pool exists, leave it


def _worker_main(spec: WorkerSpec, ready_conn, parent_pid: int) -> None:
    """The child's entry point: title, parent-death signal, stop handling, then the target."""
    set_process_title(f"krasis::{spec.title}")
    # PDEATHSIG fires when the parent *thread* that spawned us exits: spawn workers from a long-lived thread.
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    stop = threading.Event()
    signals = StopSignals(stop, parent_pid)
    signals.install_handlers()
    signals.start_watchdog()  # also catches a parent that died before the prctl above
    ctx = WorkerContext(spec, stop, parent_pid, ready_conn)
    try:
        _run_target(spec, ctx)
    except Exception as exc:
        if not ctx.is_ready:
            ctx._send({"error": f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]})
        raise
    finally:
        ready_conn.close()


def _run_target(spec: WorkerSpec, ctx: WorkerContext) -> None:
    """spec.target(ctx, *args), under cProfile when $KRASIS_PROFILE_DIR is set (see docs/BENCHMARKS.md)."""
    from krasis.common.env import profile_dir

    directory = profile_dir()
    if directory is None:
        spec.target(ctx, *spec.args)
        return
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(spec.target, ctx, *spec.args)
    finally:
        directory.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(directory / f"{spec.title}-{os.getpid()}.prof")


class WorkerHandle:
    """The parent's view of one worker process."""

    def __init__(self, spec: WorkerSpec, process, ready_conn, restarts: int = 0):
        self.spec, self.process, self.restarts = spec, process, restarts
        self.parent_pid = os.getpid()
        self._ready_conn = ready_conn
        self.ready_info: dict | None = None
        self.ready_at: float | None = None  # time.monotonic() when its ready message was read
        self.stopping = False  # set by terminate(): a Supervisor does not report this exit as a death
        self.kill_reason: str | None = None  # set by kill(): why the parent ended it

    name = property(lambda self: self.spec.name)
    pid = property(lambda self: self.process.pid)
    sentinel = property(lambda self: self.process.sentinel)
    is_alive = property(lambda self: self.process.is_alive())
    exitcode = property(lambda self: self.process.exitcode)  # None while running; -N when killed by signal N

    def wait_ready(self, timeout: float) -> dict:
        """The child's ready message ({name, title, pid, capacity}); WorkerStartError if it dies or times out first."""
        if self.ready_info is not None:
            return self.ready_info
        if not connection.wait([self._ready_conn, self.process.sentinel], timeout):
            raise WorkerStartError(f"worker {self.name} (pid {self.pid}) did not report ready within {timeout} s")
        message = self._receive() if self._ready_conn.poll() else None
        if message is not None and "error" not in message:
            self.ready_info, self.ready_at = message, time.monotonic()
            return message
        self.process.join(1.0)
        reason = f"{message['error']}; " if message else ""
        raise WorkerStartError(f"worker {self.name} exited before reporting ready ({reason}exit code {self.exitcode})")

    def _receive(self) -> dict | None:
        try:
            message = msgpack.unpackb(self._ready_conn.recv_bytes(_MAX_READY_BYTES))
        except (EOFError, OSError, ValueError):
            return None
        return message if isinstance(message, dict) else None

    def kill(self, reason: str) -> None:
        """SIGKILL (which also ends a stopped process) a worker found broken; a Supervisor reports it as a death."""
        self.kill_reason = reason
        self.process.kill()  # no is_alive() first: it reaps, racing the Supervisor's join for the exit code

    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; returns the exit code (0 when the worker stopped cleanly)."""
        self.stopping = True
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            log.warning("worker %s ignored SIGTERM for %.1f s; killing it", self.name, timeout)
            self.process.kill()
            self.process.join(timeout)
        self.close()
        return self.exitcode

    def close(self) -> None:
        """Release the parent's side (the ready pipe) of a worker that has exited; exitcode stays readable."""
        self._ready_conn.close()
        _spawned.discard(self)


_spawned: set[WorkerHandle] = set()


def spawn_worker(target: Callable, name: str, title: str, args: tuple = ()) -> WorkerHandle:
    """Start `target(ctx, *args)` in a fresh spawned process titled `krasis::<title>`; call wait_ready() next."""
    return _spawn(WorkerSpec(target, name, title, tuple(args)))


def _spawn(spec: WorkerSpec, restarts: int = 0) -> WorkerHandle:
    ctx = multiprocessing.get_context("spawn")
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_worker_main, args=(spec, ready_send, os.getpid()), name=spec.name, daemon=False)
    process.start()
    ready_send.close()  # the child holds the only write end, so its death reads as EOF
    handle = WorkerHandle(spec, process, ready_recv, restarts)
    _spawned.add(handle)
    return handle


@atexit.register
def _terminate_spawned() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that hook joins non-daemon children
    # and would wait forever on workers nobody told to stop.
    for handle in list(_spawned):
        if handle.parent_pid == os.getpid():  # not handles inherited through a fork
            handle.terminate()


class Supervisor:
    """Watches worker processes and calls `on_death(handle)` within ~`poll_s` of an exit nobody asked for."""

    def __init__(self, on_death: Callable[[WorkerHandle], None], poll_s: float = 0.1):
        self.on_death, self.poll_s = on_death, poll_s
        self._handles: list[WorkerHandle] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def handles(self) -> list[WorkerHandle]:
        with self._lock:
            return list(self._handles)

    def watch(self, handle: WorkerHandle) -> None:
        with self._lock:
            self._handles.append(handle)

    def unwatch(self, handle: WorkerHandle) -> None:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="krasis-supervisor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def check(self, timeout: float = 0.0) -> list[WorkerHandle]:
        """Wait up to `timeout` s for exits; report each unexpected one to on_death and stop watching it."""
        handles = self.handles
        exited = set(connection.wait([h.sentinel for h in handles], timeout)) if handles else set()
        dead = [h for h in handles if h.sentinel in exited]
        for handle in dead:
            self.unwatch(handle)
            handle.process.join(1.0)  # reap, so exitcode is known
            _spawned.discard(handle)  # not close(): a wait_ready() may still be reading its pipe
            if not handle.stopping:
                self._report(handle)
        return dead

    def _report(self, handle: WorkerHandle) -> None:
        log.error("worker %s (pid %s) died with exit code %s", handle.name, handle.pid, handle.exitcode)
        try:
            self.on_death(handle)
        except Exception:
            log.exception("on_death failed for worker %s", handle.name)

    def _run(self) -> None:
        while not self._closed.is_set():
            if self.handles:
                self.check(self.poll_s)
            else:
                self._closed.wait(self.poll_s)

    def restart(self, handle: WorkerHandle) -> WorkerHandle:
        """Spawn a new worker from `handle`'s spec and watch it instead; call wait_ready() on the result."""
        self.unwatch(handle)
        fresh = _spawn(handle.spec, handle.restarts + 1)
        self.watch(fresh)
        return fresh
