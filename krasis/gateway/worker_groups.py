"""The pipeline's worker processes and the gateway's ends of their sockets (used by PipelineEngineClient)."""

import dataclasses
import logging
from dataclasses import dataclass

from krasis.common.process import Supervisor, set_torch_threads, spawn_worker
from krasis.common.shm import SharedKVPool
from krasis.common.shm_segments import cleanup_stale
from krasis.common.topology import WorkerPlacement
from krasis.common.zmq_queues import AsyncPullQueue, AsyncPushQueue, ipc_endpoint
from krasis.cpu_worker.pool import HOST_CORES, DecodePool, DecodePoolSpec, decode_placements
from krasis.gpu_worker.process import PrefillWorkerConfig, prefill_title, run_prefill_worker, with_device

log = logging.getLogger("krasis.gateway")

PREFILL, DECODE = "prefill", "decode"
KV_POOL_PREFIX, EXCHANGE_PREFIX = "krasis-kv", "krasis-experts"
def prefill_threads(device: str) -> int:
    """On a GPU the worker's CPU side only launches kernels and samples. On the CPU (the fallback) it gets the
    HOST_CORES the pool leaves: more threads would stall every decode step while a prompt prefills."""
    return 1 if device == "cuda" else HOST_CORES


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline's shape, as `krasis-ctl serve` resolved it."""

    weights: object  # WeightOptions of the workers (device: their CPU side; --gpu picks the prefill device)
    gpu: str  # "auto", "none" or a CUDA index
    placements: tuple[WorkerPlacement, ...]
    kv_widths: tuple[int, ...]
    kv_dtype: str
    hidden_size: int
    top_k: int
    max_context: int
    max_batch_tokens: int
    kv_pages: int
    page_size: int
    ready_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 10.0  # silent this long (stopped, frozen): hung; workers beat every second
    stall_timeout_s: float = 600.0  # in one loop step this long: hung (a long prompt's prefill step takes minutes)
    state_widths: tuple[int, ...] = ()  # per-sequence state per layer (linear attention); () or zeros: none
    remote_listen: str | None = None  # tcp:// endpoint where a decode pool on another host joins; None: spawn one here
    model_fingerprint: str = ""  # what a joining pool's model must match (krasis.common.model_fingerprint)

    @property
    def has_state(self) -> bool:
        return any(self.state_widths)


class WorkerGroups:
    """The worker processes and the gateway's ends of their sockets: the prefill group and the decode pool.

    The decode pool restarts as a whole: a new ShardExchange (owned here, like the KV pool) for new followers.
    With `remote_listen` no decode pool is spawned here: one joins from another host (gateway.remote_pool).
    """

    def __init__(self, config: PipelineConfig, run_dir: str, max_running: int):
        self.config, self.max_running = config, max_running
        names = ("prefill", "decode", "tok-prefill", "tok-decode", "hand-off")
        self.endpoints = {name: ipc_endpoint(run_dir, name) for name in names}
        self.handles: dict[str, list] = {PREFILL: [], DECODE: []}
        self.restarting: set[str] = set()
        self.pool = self.decode_pool = self.supervisor = None
        self.hand_offs = None  # with a remote pool: the prefill worker's hand-offs come here to be shipped

    def open(self, on_death) -> None:
        """Create the KV pool and sockets, spawn every worker (call wait_ready next). Event loop thread."""
        c = self.config
        set_torch_threads(1)  # the gateway runs no tensor math; it must not hold cores the pool needs
        for prefix in (KV_POOL_PREFIX, EXCHANGE_PREFIX):  # left by a gateway that was SIGKILLed
            for name in cleanup_stale(prefix):
                log.warning("removed stale shared memory /dev/shm/%s", name)
        self.pool = SharedKVPool.create(
            KV_POOL_PREFIX, c.kv_widths, c.kv_pages, c.page_size, c.kv_dtype,
            state_widths=c.state_widths, num_state_slots=self.max_running if c.has_state else 0,
        )  # fmt: skip
        self.prefill_tokens = AsyncPullQueue(self.endpoints["tok-prefill"], bind=True)
        self.prefill_requests = AsyncPushQueue(self.endpoints["prefill"], bind=False)
        if c.remote_listen is None:
            self.decode_tokens = AsyncPullQueue(self.endpoints["tok-decode"], bind=True)
            self.decode_inbox = AsyncPushQueue(self.endpoints["decode"], bind=False)
        else:  # a pool on another host: its messages arrive over tcp, the gateway ships it the prompt KV
            self.decode_tokens = AsyncPullQueue(c.remote_listen, bind=True)
            self.hand_offs = AsyncPullQueue(self.endpoints["hand-off"], bind=True)
            self.decode_inbox = None  # gateway.remote_pool connects one when a pool joins
        self.supervisor = Supervisor(on_death)
        self.start_group(PREFILL)
        self.start_group(DECODE)

    def start_group(self, role: str) -> None:
        handles = self._spawn_prefill() if role == PREFILL else self._spawn_decode_pool()
        self.handles[role] = handles
        for handle in handles:
            self.supervisor.watch(handle)

    def _spawn_prefill(self) -> list:
        c = self.config
        hand_offs = self.endpoints["decode" if c.remote_listen is None else "hand-off"]
        config = PrefillWorkerConfig(0, c.weights, None, self.pool.descriptor.as_dict(), self.endpoints["prefill"],
                                     self.endpoints["tok-prefill"], hand_offs, c.max_context,
                                     c.max_batch_tokens)  # fmt: skip
        config = with_device(config, c.gpu)
        config = dataclasses.replace(config, threads=prefill_threads(config.weights.device))
        return [spawn_worker(run_prefill_worker, "gpu-prefill-0", prefill_title(0), (config,))]

    def _spawn_decode_pool(self) -> list:
        if self.config.remote_listen is not None:
            return []  # the pool joins from another host (gateway.remote_pool)
        c = self.config
        spec = DecodePoolSpec(decode_placements(c.placements), c.weights, self.pool.descriptor.as_dict(),
                              self.endpoints["decode"], self.endpoints["tok-decode"], c.max_context, self.max_running,
                              c.hidden_size, c.top_k, c.kv_dtype, EXCHANGE_PREFIX)  # fmt: skip
        self.decode_pool = DecodePool(spec)
        return self.decode_pool.start()

    def wait_ready(self, role: str | None = None) -> None:
        for group in [role] if role else [PREFILL, DECODE]:
            for handle in self.handles[group]:
                handle.wait_ready(self.config.ready_timeout_s)

    def role_of(self, handle) -> str | None:
        return next((role for role, handles in self.handles.items() if handle in handles), None)

    def stop_group(self, role: str) -> None:
        """Terminate a group's processes (any thread); the decode pool's exchange goes with them."""
        if role == DECODE and self.decode_pool is not None:
            self.decode_pool.stop(self.supervisor)
            self.decode_pool = None
            return
        for handle in self.handles[role]:
            self.supervisor.unwatch(handle)
            handle.terminate()

    def close(self) -> None:
        """Stop watching, stop every worker, remove the shared memory."""
        if self.supervisor is not None:
            self.supervisor.close()
            for role in (PREFILL, DECODE):
                self.stop_group(role)
        if self.pool is not None:
            self.pool.close()

    def close_sockets(self) -> None:
        for name in ("prefill_tokens", "decode_tokens", "prefill_requests", "decode_inbox", "hand_offs"):
            queue = getattr(self, name, None)
            if queue is not None:
                queue.close()
