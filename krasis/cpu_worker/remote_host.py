"""`krasis-ctl worker`: a CPU decode pool on another host, joined to a gateway over ZeroMQ tcp.

This process (`krasis::remote-decode`) joins the gateway (JoinRequest -> JoinReply), builds this host's shared KV
pool with the gateway's geometry, starts the decode pool here (the same leader and followers as on the gateway's
host) and reports RemoteReady. Then it relays: SequenceKV chunks from the gateway are written into the pool here,
HandOff and AbortRequest go on to the leader, and the pool's tokens and heartbeats go back to the gateway.

One join is one session: when a local worker dies, the gateway falls silent or asks it to leave, the session
ends (closing its sockets, which the gateway sees at once), everything here is torn down, and it joins again.
"""

import logging
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import zmq

from krasis.common.kv_transfer import write_sequence_kv
from krasis.common.protocol_pipeline import (
    REMOTE_PROTOCOL_VERSION, AbortRequest, HandOff, Heartbeat, JoinReply, JoinRequest, RemoteReady, RequestFailed,
    SequenceKV, Shutdown,
)  # fmt: skip
from krasis.common.topology import WorkerPlacement
from krasis.common.zmq_queues import PullQueue, PushQueue, ipc_endpoint
from krasis.ctl.loading import WeightOptions

log = logging.getLogger("krasis.remote")

KV_POOL_PREFIX, EXCHANGE_PREFIX = "krasis-kv", "krasis-experts"
REPLY_TIMEOUT_S = 5.0
POLL_MS = 200


class JoinRefused(RuntimeError):
    """The gateway said no; `retry` when it may say yes later (it has another pool now)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class RemoteWorkerOptions:
    """`krasis-ctl worker`'s options, resolved. dtype and quantization come from the gateway when it accepts."""

    gateway: str  # tcp://HOST:PORT, the gateway's --remote-workers endpoint
    model_dir: str
    cache_dir: str | None
    listen: str  # tcp:// endpoint this host's inbox binds (port 0: any free one)
    advertise_host: str | None  # the address the gateway connects to (default: this host's route to the gateway)
    placements: tuple[WorkerPlacement, ...]
    gateway_timeout_s: float = 10.0  # the gateway beats every second; silent this long: gone
    retry_s: float = 2.0
    ready_timeout_s: float = 300.0


@dataclass(frozen=True)
class _ModelShape:
    fingerprint: str
    kv_widths: list[int]
    state_widths: list[int]
    hidden_size: int
    top_k: int


def model_shape(model_dir: str) -> _ModelShape:
    from krasis.common.model_fingerprint import model_fingerprint
    from krasis.common.model_loader import empty_model

    model = empty_model(model_dir)  # meta device: shapes only
    return _ModelShape(model_fingerprint(model_dir), list(model.kv_widths), list(model.state_widths),
                       model.config.hidden_size, model.config.num_experts_per_tok)  # fmt: skip


class RemoteDecodeHost:
    """Joins, serves, and joins again until `stop` is set; JoinRefused (not retryable) ends `run`."""

    def __init__(self, options: RemoteWorkerOptions):
        self.options = options
        self.shape = model_shape(options.model_dir)

    def run(self, stop) -> None:
        while not stop.is_set():
            try:
                reason = self._session(stop)
                log.warning("left the gateway: %s", reason)
            except JoinRefused as exc:
                if not exc.retry:
                    raise
                log.warning("the gateway refused to take this pool for now: %s", exc)
            except (TimeoutError, OSError, RuntimeError) as exc:
                log.warning("joining %s failed: %s", self.options.gateway, exc)
            stop.wait(self.options.retry_s)

    def _session(self, stop) -> str:
        o, worker_id = self.options, secrets.token_hex(8)
        with PullQueue(o.listen, bind=True) as inbox, PushQueue(o.gateway, bind=False) as to_gateway:
            inbox_endpoint = advertised_endpoint(inbox.endpoint, o.advertise_host, o.gateway)
            s = self.shape
            join = JoinRequest(REMOTE_PROTOCOL_VERSION, worker_id, socket.gethostname(), inbox_endpoint, s.fingerprint,
                               s.kv_widths, s.state_widths, len(o.placements),
                               sum(p.threads for p in o.placements))  # fmt: skip
            to_gateway.put(join, timeout=REPLY_TIMEOUT_S)
            reply = _await_reply(inbox, worker_id)
            if not reply.accepted:
                raise JoinRefused(reply.message, reply.retry)
            log.info("joined %s as %s; loading the decode pool", o.gateway, inbox_endpoint)
            local = _LocalPool(o, s, reply)
            try:
                local.start()
                ready = RemoteReady(worker_id, local.handles[0].pid, len(o.placements), join.threads)
                to_gateway.put(ready, timeout=o.gateway_timeout_s)
                log.info("serving the gateway at %s", o.gateway)
                return _Relay(inbox, to_gateway, local, o.gateway_timeout_s).run(stop)
            finally:
                local.close()


def _await_reply(inbox: PullQueue, worker_id: str) -> JoinReply:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        msg = inbox.get(left)
        if isinstance(msg, JoinReply) and msg.worker_id == worker_id:
            return msg
    raise TimeoutError(f"no answer to the join within {REPLY_TIMEOUT_S} s")


def advertised_endpoint(bound: str, advertise_host: str | None, gateway: str) -> str:
    """The inbox's address as the gateway must dial it: a wildcard bind becomes this host's route to the gateway."""
    url = urlsplit(bound)
    host = url.hostname
    if advertise_host:
        host = advertise_host
    elif host in (None, "0.0.0.0", "*", "::"):
        gw = urlsplit(gateway)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent: only a route lookup
            probe.connect((gw.hostname, gw.port or 9))
            host = probe.getsockname()[0]
    return f"tcp://{host}:{url.port}"


class _LocalPool:
    """This host's KV pool (the gateway's geometry) and decode processes, for one session."""

    def __init__(self, options: RemoteWorkerOptions, shape: _ModelShape, reply: JoinReply):
        self.options, self.shape, self.reply = options, shape, reply
        self.run_dir = tempfile.mkdtemp(prefix="krasis-worker-")
        self.kv = self.pool = self.tokens = self.to_leader = None
        self.handles: list = []

    def start(self) -> None:
        from krasis.common.shm import SharedKVPool
        from krasis.cpu_worker.pool import DecodePool, DecodePoolSpec, decode_placements

        o, s, r = self.options, self.shape, self.reply
        states = s.state_widths if any(s.state_widths) else ()
        self.kv = SharedKVPool.create(KV_POOL_PREFIX, s.kv_widths, r.num_pages, r.page_size, r.kv_dtype,
                                      state_widths=states, num_state_slots=r.num_state_slots)  # fmt: skip
        inbox, tokens = ipc_endpoint(self.run_dir, "decode"), ipc_endpoint(self.run_dir, "tok-decode")
        self.tokens = PullQueue(tokens, bind=True)
        self.to_leader = PushQueue(inbox, bind=False)
        weights = WeightOptions(o.model_dir, r.dtype, "cpu", r.quant, r.dense_quant, o.cache_dir)
        spec = DecodePoolSpec(decode_placements(o.placements), weights, self.kv.descriptor.as_dict(), inbox, tokens,
                              r.max_context, r.max_running, s.hidden_size, s.top_k, r.kv_dtype,
                              EXCHANGE_PREFIX)  # fmt: skip
        self.pool = DecodePool(spec)
        self.handles = self.pool.start()
        self.pool.wait_ready(o.ready_timeout_s)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        for queue in (self.tokens, self.to_leader):
            if queue is not None:
                queue.close()
        if self.kv is not None:
            self.kv.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class _Relay:
    """Gateway <-> local pool, until the session ends; `run` returns why it ended."""

    def __init__(self, inbox: PullQueue, to_gateway: PushQueue, local: _LocalPool, gateway_timeout_s: float):
        self.inbox, self.to_gateway, self.local, self.timeout_s = inbox, to_gateway, local, gateway_timeout_s
        self.last_heard = time.monotonic()

    def run(self, stop) -> str:
        poller = zmq.Poller()
        poller.register(self.inbox.socket, zmq.POLLIN)
        poller.register(self.local.tokens.socket, zmq.POLLIN)
        for handle in self.local.handles:
            poller.register(handle.sentinel, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            for handle in self.local.handles:
                if handle.sentinel in ready:
                    handle.process.join(1.0)
                    return f"worker {handle.name} (pid {handle.pid}) died with exit code {handle.exitcode}"
            while (msg := self.local.tokens.get_nowait()) is not None:
                self.to_gateway.put(msg, timeout=self.timeout_s)
            while (msg := self.inbox.get_nowait()) is not None:
                self.last_heard = time.monotonic()
                if isinstance(msg, Shutdown):
                    return "the gateway asked this pool to leave"
                self._from_gateway(msg)
            if time.monotonic() - self.last_heard > self.timeout_s:
                return f"the gateway sent nothing for {self.timeout_s} s"
        return "stopped"

    def _from_gateway(self, msg) -> None:
        if isinstance(msg, SequenceKV):
            try:
                write_sequence_kv(self.local.kv, msg)
            except ValueError as exc:
                self.to_gateway.put(RequestFailed(msg.request_id, str(exc)), timeout=self.timeout_s)
        elif isinstance(msg, (HandOff, AbortRequest)):
            self.local.to_leader.put(msg, timeout=self.timeout_s)
        elif not isinstance(msg, Heartbeat):
            log.warning("ignoring an unexpected %s from the gateway", type(msg).__name__)
