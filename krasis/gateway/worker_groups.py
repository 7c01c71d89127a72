"""The pipeline's worker processes and the gateway's ends of their sockets (used by PipelineEngineClient)."""

import dataclasses
import logging
from dataclasses import dataclass

from krasis.common.process import Supervisor, set_torch_threads, spawn_worker
from krasis.common.shm import SharedKVPool
from krasis.common.shm_segments import cleanup_stale
from krasis.common.topology import WorkerPlacement
from krasis.common.zmq_queues import AsyncPullQueue, AsyncPushQueue, ipc_endpoint
from krasis.cpu_worker.process import DecodeWorkerConfig, decode_title, run_decode_worker
from krasis.gpu_worker.process import PrefillWorkerConfig, prefill_title, run_prefill_worker, with_device

log = logging.getLogger("krasis.gateway")

PREFILL, DECODE = "prefill", "decode"
KV_POOL_PREFIX, EXCHANGE_PREFIX = "krasis-kv", "krasis-experts"
# Physical cores the decode pool leaves to the gateway's event loop and the prefill worker: each token crosses
# the gateway while the pool runs the next step, and a decode thread that shares its core stalls the whole step.
HOST_CORES = 1


def decode_placements(placements: tuple[WorkerPlacement, ...]) -> tuple[WorkerPlacement, ...]:
    """The pool's placements less HOST_CORES threads, taken from the leader (worker 0), which keeps at least one."""
    leader = placements[0]
    threads = max(1, leader.threads - HOST_CORES)
    return (dataclasses.replace(leader, threads=threads), *placements[1:])


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

    @property
    def has_state(self) -> bool:
        return any(self.state_widths)


class WorkerGroups:
    """The worker processes and the gateway's ends of their sockets: the prefill group and the decode pool.

    The decode pool restarts as a whole: a new ShardExchange (owned here, like the KV pool) for new followers.
    """

    def __init__(self, config: PipelineConfig, run_dir: str, max_running: int):
        self.config, self.max_running = config, max_running
        names = ("prefill", "decode", "tok-prefill", "tok-decode")
        self.endpoints = {name: ipc_endpoint(run_dir, name) for name in names}
        self.handles: dict[str, list] = {PREFILL: [], DECODE: []}
        self.restarting: set[str] = set()
        self.pool = self.exchange = self.supervisor = None

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
        self.decode_tokens = AsyncPullQueue(self.endpoints["tok-decode"], bind=True)
        self.prefill_requests = AsyncPushQueue(self.endpoints["prefill"], bind=False)
        self.decode_inbox = AsyncPushQueue(self.endpoints["decode"], bind=False)
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
        config = PrefillWorkerConfig(0, c.weights, None, self.pool.descriptor.as_dict(), self.endpoints["prefill"],
                                     self.endpoints["tok-prefill"], self.endpoints["decode"], c.max_context,
                                     c.max_batch_tokens)  # fmt: skip
        config = with_device(config, c.gpu)
        config = dataclasses.replace(config, threads=prefill_threads(config.weights.device))
        return [spawn_worker(run_prefill_worker, "gpu-prefill-0", prefill_title(0), (config,))]

    def _spawn_decode_pool(self) -> list:
        from krasis.cpu_worker.shard_exchange import ShardExchange

        c, shards = self.config, len(self.config.placements)
        if shards > 1:
            self.exchange = ShardExchange.create(shards, self.max_running, c.hidden_size, c.top_k, c.kv_dtype,
                                                 name_prefix=EXCHANGE_PREFIX)
        exchange = None if self.exchange is None else self.exchange.descriptor.as_dict()

        weights = dataclasses.replace(c.weights, device="cpu")  # the decode pool runs from system RAM

        def spawn(placement, pids):
            config = DecodeWorkerConfig(placement, shards, weights, self.pool.descriptor.as_dict(),
                                        self.endpoints["decode"], self.endpoints["tok-decode"], c.max_context,
                                        exchange, pids)  # fmt: skip
            title = decode_title(placement.index)
            return spawn_worker(run_decode_worker, title, title, (config,))

        placements = decode_placements(c.placements)
        followers = [spawn(p, ()) for p in placements[1:]]  # first: the leader watches their pids
        leader = spawn(placements[0], (0, *(f.pid for f in followers)))
        return [leader, *followers]

    def wait_ready(self, role: str | None = None) -> None:
        for group in [role] if role else [PREFILL, DECODE]:
            for handle in self.handles[group]:
                handle.wait_ready(self.config.ready_timeout_s)

    def role_of(self, handle) -> str | None:
        return next((role for role, handles in self.handles.items() if handle in handles), None)

    def stop_group(self, role: str) -> None:
        """Terminate a group's processes (any thread); the decode pool's exchange goes with them."""
        for handle in self.handles[role]:
            self.supervisor.unwatch(handle)
            handle.terminate()
        if role == DECODE and self.exchange is not None:
            self.exchange.close()
            self.exchange = None

    def close(self) -> None:
        """Stop watching, stop every worker, remove the shared memory."""
        if self.supervisor is not None:
            self.supervisor.close()
            for role in (PREFILL, DECODE):
                self.stop_group(role)
        if self.pool is not None:
            self.pool.close()

    def close_sockets(self) -> None:
        for name in ("prefill_tokens", "decode_tokens", "prefill_requests", "decode_inbox"):
            queue = getattr(self, name, None)
            if queue is not None:
                queue.close()
