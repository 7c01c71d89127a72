"""Hung-worker detection: a silent worker or one stuck in a step is hung; a busy or starting one is not."""

import threading
import time
from types import SimpleNamespace

from krasis.common.heartbeat import LoopProgress, start_heartbeat
from krasis.common.protocol_pipeline import Heartbeat, WorkerRole
from krasis.common.zmq_queues import PullQueue, ipc_endpoint
from krasis.gateway.heartbeats import HeartbeatMonitor


def handle(pid: int, ready_s_ago: float | None):
    ready_at = None if ready_s_ago is None else time.monotonic() - ready_s_ago
    return SimpleNamespace(pid=pid, ready_at=ready_at, name=f"w{pid}")


def beat(monitor: HeartbeatMonitor, pid: int, busy_s: float = 0.0) -> None:
    monitor.beat(Heartbeat(WorkerRole.CPU_DECODE, 0, pid, 1, busy_s))


def test_a_worker_silent_past_the_timeout_is_hung_and_one_that_beats_is_not():
    monitor = HeartbeatMonitor(heartbeat_timeout_s=5.0, stall_timeout_s=600.0)
    silent, beating, starting = handle(1, 6.0), handle(2, 6.0), handle(3, None)
    beat(monitor, 2)
    found = monitor.hung([silent, beating, starting])
    assert [(h.pid, "no heartbeat" in reason) for h, reason in found] == [(1, True)]


def test_a_long_step_is_hung_only_past_the_stall_timeout():
    monitor = HeartbeatMonitor(heartbeat_timeout_s=5.0, stall_timeout_s=60.0)
    long_prefill, stuck = handle(1, 100.0), handle(2, 100.0)
    beat(monitor, 1, busy_s=59.0)
    beat(monitor, 2, busy_s=61.0)
    assert [(h.pid, "one step" in reason) for h, reason in monitor.hung([long_prefill, stuck])] == [(2, True)]


def test_the_heartbeat_thread_reports_the_loop_in_its_step(tmp_path):
    progress, stop = LoopProgress(), threading.Event()
    with PullQueue(ipc_endpoint(tmp_path, "tokens"), bind=True) as pull:
        start_heartbeat(pull.endpoint, WorkerRole.GPU_PREFILL, 0, progress, stop, interval_s=0.05)
        with progress.busy():
            time.sleep(0.2)  # a step: the thread keeps beating meanwhile
            during = pull.get(5.0)
            while during.busy_s < 0.1:
                during = pull.get(5.0)
        after = pull.get(5.0)
        while after.busy_s > 0:
            after = pull.get(5.0)
        stop.set()
    assert during.role is WorkerRole.GPU_PREFILL and during.steps == 0
    assert after.steps == 1
