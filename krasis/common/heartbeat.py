"""A worker's heartbeat to the gateway: a thread that reports the worker loop's progress once a second.

Why a thread, and why each beat carries the loop's progress: beats sent by the loop itself would stop during
one long step (prefilling a long prompt on a big model takes minutes) and make a busy worker look hung, while
a thread alone would keep beating for a loop stuck for ever. So the thread beats as long as the process runs
(a SIGSTOPped or frozen process falls silent: the gateway's heartbeat timeout, seconds), and every beat says
how long the loop has been inside its current piece of work (the gateway's stall timeout, generous).
"""

import contextlib
import logging
import os
import threading
import time

from krasis.common.protocol_pipeline import Heartbeat, WorkerRole

log = logging.getLogger("krasis.heartbeat")

HEARTBEAT_INTERVAL_S = 1.0


class LoopProgress:
    """What a worker loop tells its heartbeat thread: pieces of work done, and since when it is in one."""

    def __init__(self):
        self.steps = 0
        self._busy_since: float | None = None

    @contextlib.contextmanager
    def busy(self):
        """Around each piece of work (a step, a batch of messages); the wait for work stays outside."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None
            self.steps += 1

    def busy_s(self) -> float:
        since = self._busy_since  # one read: the loop may clear it meanwhile
        return 0.0 if since is None else time.monotonic() - since


def start_heartbeat(endpoint: str, role: WorkerRole, index: int, progress: LoopProgress, stop: threading.Event,
                    interval_s: float = HEARTBEAT_INTERVAL_S) -> threading.Thread:  # fmt: skip
    """Beat to `endpoint` (the gateway's PULL socket for this worker's tokens) every `interval_s` until `stop`."""
    thread = threading.Thread(target=_beat, args=(endpoint, role, index, progress, stop, interval_s),
                              name="krasis-heartbeat", daemon=True)  # fmt: skip
    thread.start()
    return thread


def _beat(endpoint, role, index, progress: LoopProgress, stop: threading.Event, interval_s: float) -> None:
    from krasis.common.zmq_queues import PushQueue

    pid = os.getpid()
    with PushQueue(endpoint, bind=False) as queue:  # its own socket: a socket belongs to one thread
        while not stop.wait(interval_s):
            try:
                queue.put(Heartbeat(role, index, pid, progress.steps, progress.busy_s()), timeout=interval_s)
            except TimeoutError:
                log.warning("heartbeat to %s: the gateway is not reading", endpoint)
