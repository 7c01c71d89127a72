"""One host's CPU decode pool: its ShardExchange and its processes (leader + followers), started and stopped as one.

Used by the gateway for the pool on its own host and by `krasis-ctl worker` for a pool on another host.
"""

import dataclasses
from dataclasses import dataclass

from krasis.common.process import spawn_worker
from krasis.common.topology import WorkerPlacement
from krasis.cpu_worker.process import DecodeWorkerConfig, decode_title, run_decode_worker
from krasis.ctl.loading import WeightOptions

# Physical cores the decode pool leaves to the gateway's event loop and the prefill worker (or, on another host, to
# the process relaying its messages): each token crosses it while the pool runs the next step, and a decode
# thread that shares its core stalls the whole step.
HOST_CORES = 1


def decode_placements(placements: tuple[WorkerPlacement, ...]) -> tuple[WorkerPlacement, ...]:
    """The pool's placements less HOST_CORES threads, taken from the leader (worker 0), which keeps at least one."""
    leader = placements[0]
    threads = max(1, leader.threads - HOST_CORES)
    return (dataclasses.replace(leader, threads=threads), *placements[1:])


@dataclass(frozen=True)
class DecodePoolSpec:
    """Where the pool's processes run and what they attach to."""

    placements: tuple[WorkerPlacement, ...]
    weights: WeightOptions
    kv_pool: dict  # KVPoolDescriptor.as_dict() of the host's shared pool
    inbox_endpoint: str  # bound by the leader: HandOff, AbortRequest
    tokens_endpoint: str  # connected by every worker: TokenBatch, RequestFailed, Heartbeat
    max_context: int
    max_running: int  # sequences in one step: the exchange's row capacity
    hidden_size: int
    top_k: int
    kv_dtype: str
    exchange_prefix: str = "krasis-experts"


class DecodePool:
    """Owns the pool's ShardExchange (with more than one shard) and the handles of its processes."""

    def __init__(self, spec: DecodePoolSpec):
        self.spec = spec
        self.handles: list = []
        self.exchange = None

    def start(self) -> list:
        """Spawn the followers, then the leader (which watches their pids); returns the handles, leader first."""
        from krasis.cpu_worker.shard_exchange import ShardExchange

        s, shards = self.spec, len(self.spec.placements)
        if shards > 1:
            self.exchange = ShardExchange.create(shards, s.max_running, s.hidden_size, s.top_k, s.kv_dtype,
                                                 name_prefix=s.exchange_prefix)  # fmt: skip
        exchange = None if self.exchange is None else self.exchange.descriptor.as_dict()
        weights = dataclasses.replace(s.weights, device="cpu")  # the decode pool runs from system RAM

        def spawn(placement, pids):
            config = DecodeWorkerConfig(placement, shards, weights, s.kv_pool, s.inbox_endpoint, s.tokens_endpoint,
                                        s.max_context, exchange, pids)  # fmt: skip
            title = decode_title(placement.index)
            return spawn_worker(run_decode_worker, title, title, (config,))

        followers = [spawn(p, ()) for p in s.placements[1:]]
        leader = spawn(s.placements[0], (0, *(f.pid for f in followers)))
        self.handles = [leader, *followers]
        return self.handles

    def wait_ready(self, timeout_s: float) -> None:
        for handle in self.handles:
            handle.wait_ready(timeout_s)

    def stop(self, supervisor=None) -> None:
        """Terminate every process (unwatched first, so no death is reported), then remove the exchange."""
        for handle in self.handles:
            if supervisor is not None:
                supervisor.unwatch(handle)
            handle.terminate()
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None
