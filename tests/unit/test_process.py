"""Worker processes: title, ready handshake, parent-death exit, clean SIGTERM, supervision and restart."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from krasis.common.process import StopSignals, Supervisor, WorkerStartError, spawn_worker

READY_TIMEOUT_S = 60  # spawn start-up on a loaded 2-core CI box; the tests never wait this long when things work


# Worker targets: module level, so the spawned child can import them.
def serve_until_stopped(ctx, slots):
    ctx.ready({"slots": slots})
    ctx.stop.wait()


def crash_before_ready(ctx):
    raise RuntimeError("weights file is missing")


def exit_before_ready(ctx):
    os._exit(3)


def never_ready(ctx):
    ctx.stop.wait()


def spawn_grandchild(ctx):
    """An intermediate parent: starts a worker, reports its pid, then waits to be killed."""
    child = spawn_worker(serve_until_stopped, "grandchild", "test-grandchild", (1,))
    ctx.ready({"grandchild_pid": child.wait_ready(READY_TIMEOUT_S)["pid"]})
    ctx.stop.wait()


def has_exited(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat.rsplit(b")", 1)[1].split()[0] == b"Z"  # exited, not yet reaped by its new parent


@pytest.fixture
def handles():
    started = []
    yield started
    for handle in started:
        handle.terminate(timeout=2)


def test_worker_reports_ready_with_capacity_and_title(handles):
    worker = spawn_worker(serve_until_stopped, "cpu-decode-1", "cpu-decode-1", (8,))
    handles.append(worker)
    info = worker.wait_ready(READY_TIMEOUT_S)
    assert info == {"name": "cpu-decode-1", "title": "cpu-decode-1", "pid": worker.pid, "capacity": {"slots": 8}}
    assert Path(f"/proc/{worker.pid}/comm").read_text().strip() == "krasis::cpu-dec"  # the kernel keeps 15 bytes
    assert Path(f"/proc/{worker.pid}/cmdline").read_bytes().rstrip(b"\0") == b"krasis::cpu-decode-1"
    assert worker.is_alive and worker.exitcode is None


def test_sigterm_stops_worker_cleanly_with_exit_code_0(handles):
    worker = spawn_worker(serve_until_stopped, "w", "test-sigterm", (1,))
    handles.append(worker)
    worker.wait_ready(READY_TIMEOUT_S)
    started = time.monotonic()
    assert worker.terminate(timeout=5) == 0
    assert time.monotonic() - started < 2
    assert not worker.is_alive


def test_worker_exits_when_its_parent_dies(handles):
    parent = spawn_worker(spawn_grandchild, "intermediate", "test-parent")
    handles.append(parent)
    grandchild_pid = parent.wait_ready(READY_TIMEOUT_S)["capacity"]["grandchild_pid"]
    assert not has_exited(grandchild_pid)
    os.kill(parent.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not has_exited(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert has_exited(grandchild_pid)


def test_watchdog_sets_stop_when_parent_pid_changes():
    stop = threading.Event()
    StopSignals(stop, parent_pid=os.getppid() + 1, poll_s=0.02, orphan_grace_s=None).start_watchdog()
    assert stop.wait(2)


def test_supervisor_notices_sigkilled_worker_within_1s_and_restarts_it(handles):
    deaths, died = [], threading.Event()

    def on_death(handle):
        deaths.append((handle, time.monotonic()))
        died.set()

    supervisor = Supervisor(on_death)
    worker = spawn_worker(serve_until_stopped, "cpu-decode-0", "test-supervised", (4,))
    handles.append(worker)
    worker.wait_ready(READY_TIMEOUT_S)
    supervisor.watch(worker)
    supervisor.start()
    try:
        killed_at = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        assert died.wait(1.0)
        [(dead, seen_at)] = deaths
        assert dead is worker and dead.exitcode == -signal.SIGKILL and seen_at - killed_at < 1.0
        fresh = supervisor.restart(dead)
        handles.append(fresh)
        assert fresh.wait_ready(READY_TIMEOUT_S)["capacity"] == {"slots": 4}
        assert fresh.pid != worker.pid and fresh.restarts == 1 and supervisor.handles == [fresh]
    finally:
        supervisor.close()


def test_supervisor_ignores_workers_it_was_told_to_stop(handles):
    supervisor = Supervisor(on_death=lambda h: pytest.fail(f"{h.name} reported dead"))
    worker = spawn_worker(serve_until_stopped, "w", "test-stopped", (1,))
    handles.append(worker)
    worker.wait_ready(READY_TIMEOUT_S)
    supervisor.watch(worker)
    worker.terminate()
    assert supervisor.check(timeout=1.0) == [worker] and supervisor.handles == []


def test_wait_ready_raises_promptly_when_worker_crashes_before_ready(handles):
    worker = spawn_worker(crash_before_ready, "gpu-prefill-0", "test-crash")
    handles.append(worker)
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match="RuntimeError: weights file is missing.*exit code 1"):
        worker.wait_ready(READY_TIMEOUT_S)
    assert time.monotonic() - started < READY_TIMEOUT_S / 4  # it did not sit out the timeout


def test_wait_ready_raises_when_worker_exits_before_ready(handles):
    worker = spawn_worker(exit_before_ready, "w", "test-exit")
    handles.append(worker)
    with pytest.raises(WorkerStartError, match="exit code 3"):
        worker.wait_ready(READY_TIMEOUT_S)


def test_wait_ready_times_out_on_a_silent_worker(handles):
    worker = spawn_worker(never_ready, "w", "test-silent")
    handles.append(worker)
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match="did not report ready within 0.3 s"):
        worker.wait_ready(0.3)
    assert time.monotonic() - started < 1
