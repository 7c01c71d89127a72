"""`krasis::cpu-decode-<i>`: the CPU decode pool's processes.

Worker 0 (the leader) runs CpuDecodeCore over the shared KV pool: attention, routing and its own expert shard;
workers 1..N-1 (followers) hold only their expert shards and answer each MoE layer through the ShardExchange.
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from krasis.common.heartbeat import LoopProgress, start_heartbeat
from krasis.common.protocol import FinishReason
from krasis.common.protocol_pipeline import (
    AbortRequest, HandOff, RequestFailed, Shutdown, TokenBatch, TokenOut, WorkerRole,
)  # fmt: skip
from krasis.common.topology import WorkerPlacement
from krasis.ctl.loading import WeightOptions

log = logging.getLogger("krasis.cpu_worker")

IDLE_POLL_S = 0.05
MAX_TOMBSTONES = 4096  # aborted ids whose hand-off may still arrive (it travels on another pipe)


@dataclass(frozen=True)
class DecodeWorkerConfig:
    """What one decode-pool process needs; built by the gateway, sent through spawn."""

    placement: WorkerPlacement
    num_shards: int
    weights: WeightOptions
    kv_pool: dict  # KVPoolDescriptor.as_dict()
    hand_off_endpoint: str  # bound by the leader: HandOff from prefill, AbortRequest from the gateway
    tokens_endpoint: str  # connected by the leader: TokenBatch, RequestFailed to the gateway
    max_context: int
    exchange: dict | None  # ShardExchangeDescriptor.as_dict(), None with one worker
    shard_pids: tuple[int, ...]  # pid of each shard (index 0 unused): the leader's liveness check

    @property
    def shard_index(self) -> int:
        return self.placement.index


def decode_title(index: int) -> str:
    return f"cpu-decode-{index}"


def run_decode_worker(ctx, config: DecodeWorkerConfig) -> None:
    """Worker target: pin, load, report ready, then lead the pool (shard 0) or serve an expert shard."""
    from krasis.cpu_worker.pinning import pin_current_process

    pinning = pin_current_process(config.placement, bind_memory=True)
    capacity = {"role": "cpu-decode", "index": config.shard_index, "threads": pinning.threads,
                "cpus": list(pinning.cpus), "memory_policy": pinning.memory_policy}  # fmt: skip
    if config.shard_index == 0:
        model, tokenizer, shards = _load_leader(config)
        _lead(ctx, config, model, tokenizer.eos_token_ids, capacity, shards)
    else:
        _follow(ctx, config, capacity)


class ExchangedExperts(nn.Module):
    """Stands in for a layer's StackedExperts on the leader: shard 0 computes here, the rest via the exchange."""

    def __init__(self, layer: int, exchange, own_shard, alive):
        super().__init__()
        self.layer, self.exchange, self.own_shard, self.alive = layer, exchange, own_shard, alive

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_*: [T, K] -> [T, H] in x.dtype, rounded once from the fp32 sum as StackedExperts does
        out = self.exchange.run_layer(self.layer, x, topk_ids, topk_weights, self.own_shard, self.alive)
        return out.to(x.dtype)


def _load_leader(config: DecodeWorkerConfig):
    """(model, tokenizer, shards): the whole model with one worker (shards None); with several, all but the other
    shards' experts, and (MoE parents, shard 0 of each) for _shard_model (see shard_weights)."""
    from krasis.common.tokenizer import Tokenizer
    from krasis.ctl.loading import load_for_generation

    if config.num_shards == 1:
        return (*load_for_generation(config.weights), None)
    from krasis.cpu_worker.shard_weights import load_leader_model

    w, directory = config.weights, _model_dir(config.weights)
    model, parents, shards = load_leader_model(directory, config.num_shards, _dtype(w), _plan(w), w.cache_dir)
    return model, Tokenizer.from_dir(directory), (parents, shards)


def _lead(ctx, config: DecodeWorkerConfig, model, eos_token_ids, capacity: dict, shards) -> None:
    from krasis.common.shm import SharedKVPool, shared_kv_cache
    from krasis.common.zmq_queues import PullQueue, PushQueue
    from krasis.cpu_worker.core import CpuDecodeCore

    exchange = None
    if config.num_shards > 1:
        exchange = _shard_model(config, *shards)
    pool = SharedKVPool.attach(config.kv_pool)
    core = CpuDecodeCore(model, shared_kv_cache(pool), eos_token_ids, model.config.vocab_size, config.max_context)
    inbox = PullQueue(config.hand_off_endpoint, bind=True)
    tokens = PushQueue(config.tokens_endpoint, bind=False)
    ctx.ready({**capacity, "kv_pages": pool.num_pages, "shards": config.num_shards})
    loop = _DecodeLoop(core, inbox, tokens)
    start_heartbeat(config.tokens_endpoint, WorkerRole.CPU_DECODE, 0, loop.progress, ctx.stop)
    try:
        loop.run(ctx.stop)
    finally:
        inbox.close()
        tokens.close()
        pool.close()
        if exchange is not None:
            exchange.close()


def _shard_model(config: DecodeWorkerConfig, parents, shards):
    """Give each MoE parent its shard 0 plus the exchange in place of its experts; returns the attached exchange."""
    from krasis.cpu_worker.shard_exchange import ShardExchange, pids_alive

    exchange = ShardExchange.attach(config.exchange)
    alive = pids_alive(dict(enumerate(config.shard_pids)))
    for layer, (parent, shard) in enumerate(zip(parents, shards)):
        parent.experts = ExchangedExperts(layer, exchange, shard, alive)
    return exchange


def _follow(ctx, config: DecodeWorkerConfig, capacity: dict) -> None:
    from krasis.cpu_worker.shard_exchange import ShardExchange

    index = config.shard_index
    shards = _load_shards(config.weights, index, config.num_shards)
    exchange = ShardExchange.attach(config.exchange)
    follower = exchange.follower(index)
    ctx.ready(capacity)
    progress = LoopProgress()
    start_heartbeat(config.tokens_endpoint, WorkerRole.CPU_DECODE, index, progress, ctx.stop)

    @torch.inference_mode()
    def compute(step):
        # weights travel as fp32; the leader's own shard multiplies in the model dtype: round back to match
        with progress.busy():
            return shards[step.layer].partial(step.x, step.topk_ids, step.topk_weights.to(step.x.dtype))

    try:
        follower.serve(compute, stop=ctx.stop)
    finally:
        exchange.close()


def _load_shards(weights: WeightOptions, index: int, count: int) -> list:
    """Only this follower's experts, never the whole model (see shard_weights)."""
    from krasis.cpu_worker.shard_weights import load_expert_shards

    return load_expert_shards(_model_dir(weights), index, count, _dtype(weights), _plan(weights), weights.cache_dir)


def _model_dir(weights: WeightOptions):
    from krasis.common.default_model import default_model_dir

    return weights.model_dir or default_model_dir()


def _dtype(weights: WeightOptions):
    from krasis.common.model_loader import resolve_dtype

    return resolve_dtype(weights.dtype)


def _plan(weights: WeightOptions):
    from krasis.common.quant.plan import QuantPlan

    return QuantPlan.parse(weights.quant, weights.dense_quant)


class _DecodeLoop:
    """The leader's message loop: hand-offs join the batch, aborts leave it (and are confirmed), one step a turn."""

    def __init__(self, core, inbox, tokens):
        self.core, self.inbox, self.tokens = core, inbox, tokens
        self.tombstones: OrderedDict[str, None] = OrderedDict()
        self.progress = LoopProgress()

    def run(self, stop) -> None:
        while not stop.is_set():
            msg = self.inbox.get(0 if self.core.has_work else IDLE_POLL_S)
            with self.progress.busy():
                if not self._turn(msg):
                    return

    def _turn(self, msg) -> bool:
        """Apply `msg` and every message queued behind it, then run one step; False on Shutdown."""
        while msg is not None:
            if isinstance(msg, Shutdown):
                return False
            self._apply(msg)
            msg = self.inbox.get_nowait()
        if self.core.has_work:
            events = self.core.step()  # a failure here (a dead shard) ends the worker: the pool is rebuilt
            if events:
                self.tokens.put(TokenBatch(events))
        return True

    def _apply(self, msg) -> None:
        if isinstance(msg, HandOff):
            if self.tombstones.pop(msg.request_id, 0) is None:
                return  # aborted before its hand-off arrived
            try:
                self.core.add(msg)
            except ValueError as exc:
                self.tokens.put(RequestFailed(msg.request_id, str(exc)))
        elif isinstance(msg, AbortRequest):
            self._abort(msg.request_id)
        else:
            log.warning("decode worker: ignoring an unexpected %s", type(msg).__name__)

    def _abort(self, request_id: str) -> None:
        if any(s.request_id == request_id for s in self.core.running):
            self.core.abort(request_id)
        else:
            self.tombstones[request_id] = None
            while len(self.tombstones) > MAX_TOMBSTONES:
                self.tombstones.popitem(last=False)
        # After this confirmation the request's pages are never written here again.
        self.tokens.put(TokenBatch([TokenOut(request_id, 0, None, FinishReason.ABORT, None)]))
