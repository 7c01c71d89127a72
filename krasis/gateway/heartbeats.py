"""Hung-worker detection in the gateway, from the workers' heartbeats (see krasis.common.heartbeat).

A worker is hung when it is silent for `heartbeat_timeout_s` (stopped, frozen, or a thread holding the GIL), or
when its loop has been inside one piece of work for `stall_timeout_s`. A hung worker is killed; the Supervisor
then reports it as a death, which fails its requests and restarts it (/health is 503 meanwhile).
"""

import asyncio
import logging
import time

from krasis.common.protocol_pipeline import Heartbeat

log = logging.getLogger("krasis.gateway")

CHECK_EVERY_S = 0.5


class HeartbeatMonitor:
    """The last beat of each worker process (by pid); `hung` judges the ready workers it is given."""

    def __init__(self, heartbeat_timeout_s: float, stall_timeout_s: float):
        self.heartbeat_timeout_s, self.stall_timeout_s = heartbeat_timeout_s, stall_timeout_s
        self._beats: dict[int, tuple[float, float]] = {}  # pid -> (when it arrived, busy_s it reported)

    def beat(self, msg: Heartbeat) -> None:
        self._beats[msg.pid] = (time.monotonic(), msg.busy_s)

    def hung(self, handles: list) -> list[tuple[object, str]]:
        """(handle, reason) for each ready worker in `handles` found hung; forgets beats of other pids."""
        now, found = time.monotonic(), []
        self._beats = {h.pid: self._beats[h.pid] for h in handles if h.pid in self._beats}
        for handle in handles:
            if handle.ready_at is None:
                continue  # still starting: wait_ready has its own timeout
            seen, busy_s = self._beats.get(handle.pid, (handle.ready_at, 0.0))
            silent_s = now - seen
            if silent_s > self.heartbeat_timeout_s:
                found.append((handle, f"sent no heartbeat for {silent_s:.1f} s (stopped or frozen)"))
            elif busy_s > 0 and busy_s + silent_s > self.stall_timeout_s:
                found.append((handle, f"has been in one step of its loop for {busy_s + silent_s:.0f} s"))
        return found


async def watch_heartbeats(monitor: HeartbeatMonitor, watched) -> None:
    """Kill every hung worker among `watched()` (workers not already restarting, or a joined remote pool)."""
    while True:
        await asyncio.sleep(CHECK_EVERY_S)
        for handle, reason in monitor.hung(watched()):
            log.error("worker %s (pid %s) %s; killing it", handle.name, handle.pid, reason)
            try:
                handle.kill(f"hung: it {reason}")
            except OSError:  # gone meanwhile: the Supervisor reports that exit
                log.exception("killing worker %s failed", handle.name)
