"""`krasis::gpu-prefill-<i>`: GpuPrefillCore behind ZeroMQ: prompts in, first tokens to the gateway,
hand-offs to decode.

The same code runs on the CPU when there is no GPU (`--gpu none`): only the model's device changes.
"""

import dataclasses
import logging
from dataclasses import dataclass

from krasis.common.heartbeat import LoopProgress, start_heartbeat
from krasis.common.protocol import FinishReason
from krasis.common.protocol_pipeline import (
    AbortRequest, AddRequest, RequestFailed, Shutdown, TokenBatch, TokenOut, WorkerRole,
)  # fmt: skip
from krasis.ctl.loading import WeightOptions

log = logging.getLogger("krasis.gpu_worker")

IDLE_POLL_S = 0.05  # how long an idle worker waits for a message before checking its stop event


@dataclass(frozen=True)
class PrefillWorkerConfig:
    """What one prefill worker needs; built by the gateway, sent through spawn."""

    index: int
    weights: WeightOptions  # weights.device is "cpu" or "cuda"
    cuda_index: int | None
    kv_pool: dict  # KVPoolDescriptor.as_dict()
    requests_endpoint: str  # bound here: AddRequest, AbortRequest from the gateway
    tokens_endpoint: str  # connected: TokenBatch, RequestFailed to the gateway
    hand_off_endpoint: str  # connected: HandOff to decode worker 0
    max_context: int
    max_batch_tokens: int
    threads: int = 1  # torch CPU threads: the prefill itself on the CPU, kernel launches and sampling on a GPU


def run_prefill_worker(ctx, config: PrefillWorkerConfig) -> None:
    """Worker target (see krasis.common.process.spawn_worker): load, report ready, serve until stopped."""
    from krasis.common.env import use_expandable_cuda_segments

    use_expandable_cuda_segments()
    import torch

    from krasis.common.process import set_torch_threads
    from krasis.common.shm import SharedKVPool, shared_kv_cache
    from krasis.common.zmq_queues import PullQueue, PushQueue
    from krasis.ctl.loading import load_for_generation
    from krasis.gpu_worker.core import GpuPrefillCore

    set_torch_threads(config.threads)
    if config.cuda_index is not None:
        torch.cuda.set_device(config.cuda_index)
    pool = SharedKVPool.attach(config.kv_pool)
    if config.weights.device == "cuda":
        core, tokenizer = _streaming_core(config, shared_kv_cache(pool))
    else:
        model, tokenizer = load_for_generation(config.weights)
        core = GpuPrefillCore(model, shared_kv_cache(pool), tokenizer.eos_token_ids, model.config.vocab_size,
                              config.max_batch_tokens, max_context=config.max_context)  # fmt: skip
    requests = PullQueue(config.requests_endpoint, bind=True)
    tokens = PushQueue(config.tokens_endpoint, bind=False)
    hand_offs = PushQueue(config.hand_off_endpoint, bind=False)
    device = str(core.device)
    ctx.ready({"role": "gpu-prefill", "index": config.index, "device": device, "kv_pages": pool.num_pages,
               "threads": torch.get_num_threads()})  # fmt: skip
    progress = LoopProgress()
    start_heartbeat(config.tokens_endpoint, WorkerRole.GPU_PREFILL, config.index, progress, ctx.stop)
    try:
        _serve(ctx, core, requests, tokens, hand_offs, progress)
    finally:
        for queue in (requests, tokens, hand_offs):
            queue.close()
        core.close()  # unregisters the pool from CUDA before it is unmapped
        pool.close()


def _streaming_core(config: PrefillWorkerConfig, kv):
    """The model loads on the CPU side (memory-mapped cache); the VRAM plan decides what the GPU holds."""
    import torch

    from krasis.ctl.loading import load_for_generation
    from krasis.gpu_worker.core import GpuPrefillCore
    from krasis.gpu_worker.prefill_cost import crossover_tokens
    from krasis.gpu_worker.prefill_runner import CpuPrefillRoute, build_prefill_runner, measure_rates

    host_model, tokenizer = load_for_generation(dataclasses.replace(config.weights, device="cpu"))
    device = torch.device("cuda", torch.cuda.current_device())
    runner = build_prefill_runner(host_model, device, config.weights.vram_budget_gib,
                                  step_tokens=config.max_context, kv_dtype_bytes=kv.layers[0].element_size())  # fmt: skip
    log.info("%s", runner.plan.describe())
    route = None
    if runner.plan.streams:
        rates = measure_rates(runner, host_model)
        route = CpuPrefillRoute(host_model, rates, runner.plan.streamed_bytes)
        log.info("prefill on the CPU below %s tokens (link %.1f GB/s, GPU %.0f tok/s, CPU %.0f tok/s)",
                 crossover_tokens(runner.plan.streamed_bytes, rates), rates.link_bytes_per_s / 1e9,
                 rates.gpu_tokens_per_s, rates.cpu_tokens_per_s)  # fmt: skip
    core = GpuPrefillCore(runner.model, kv, tokenizer.eos_token_ids, host_model.config.vocab_size,
                          config.max_batch_tokens, max_context=config.max_context, runner=runner, cpu_route=route)  # fmt: skip
    return core, tokenizer


def _serve(ctx, core, requests, tokens, hand_offs, progress: LoopProgress) -> None:
    while not ctx.stop.is_set():
        msg = requests.get(0 if core.has_work else IDLE_POLL_S)
        with progress.busy():
            while msg is not None:
                if isinstance(msg, Shutdown):
                    return
                _apply(core, msg, tokens)
                msg = requests.get_nowait()
            if core.has_work:
                _step(core, tokens, hand_offs)


def _apply(core, msg, tokens) -> None:
    if isinstance(msg, AddRequest):
        try:
            core.add(msg)
        except ValueError as exc:
            tokens.put(RequestFailed(msg.request_id, str(exc)))
    elif isinstance(msg, AbortRequest):
        core.abort(msg.request_id)
        # The confirmation: after it this worker never writes the request's pages (nor hands it off) again.
        tokens.put(TokenBatch([TokenOut(msg.request_id, 0, None, FinishReason.ABORT, None)]))
    else:
        log.warning("prefill worker: ignoring an unexpected %s", type(msg).__name__)


def _step(core, tokens, hand_offs) -> None:
    batch = list(core.running) + list(core.waiting)
    try:
        events, ready = core.step()
    except Exception as exc:  # one failed step fails the sequences in it, not the worker
        log.exception("prefill step failed")
        for seq in batch:
            core.abort(seq.request_id)
            tokens.put(RequestFailed(seq.request_id, f"prefill failed: {type(exc).__name__}: {exc}"))
        return
    if events:
        tokens.put(TokenBatch(events))  # first tokens go out before their hand-offs
    for hand_off in ready:
        hand_offs.put(hand_off)


def prefill_title(index: int) -> str:
    return f"gpu-prefill-{index}"


def with_device(config: PrefillWorkerConfig, gpu: str) -> PrefillWorkerConfig:
    """`gpu` as `--gpu` gives it, resolved: "none" -> cpu, "auto" -> cuda:0 if there is one, "N" -> cuda:N."""
    import torch

    if gpu == "none" or (gpu == "auto" and not torch.cuda.is_available()):
        return dataclasses.replace(config, weights=dataclasses.replace(config.weights, device="cpu"), cuda_index=None)
    index = 0 if gpu == "auto" else int(gpu)
    return dataclasses.replace(config, weights=dataclasses.replace(config.weights, device="cuda"), cuda_index=index)
