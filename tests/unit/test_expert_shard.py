"""Expert shards: partials over any split sum to the full MoE output; the shared-memory exchange among workers."""

import os
import signal
import threading
import time

import msgpack
import pytest
import torch

from krasis.common.layers.moe import StackedExperts
from krasis.common.process import spawn_worker
from krasis.common.quant.formats import QuantSpec, quantize
from krasis.common.shm_segments import SHM_DIR
from krasis.cpu_worker.expert_shard import ExpertShard, build_shards, shard_range
from krasis.cpu_worker.shard_exchange import ShardExchange, ShardWorkerDied, pids_alive

E, H, I, K = 8, 64, 32, 3
UNUSED_EXPERT = 5  # no token routes here: its shard must still answer (with zeros where it owns nothing)
READY_TIMEOUT_S = 60  # spawned children import torch; slow on a loaded 2-core box


def make_experts(seed: int, quant: str | None = None) -> StackedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = StackedExperts(E, H, I, "silu")
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=g) / I**0.5)
    if quant is not None:
        for name in ("gate_up_proj", "down_proj"):
            experts.use_quantized(name, quantize(getattr(experts, name).detach(), QuantSpec.parse(quant)))
    return experts


def make_step(seed: int, tokens: int, dtype=torch.float32):
    """x [T, H], ids [T, K] (distinct per token, never UNUSED_EXPERT, spanning shards), weights [T, K]."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor([e for e in range(E) if e != UNUSED_EXPERT])
    ids = torch.stack([used[torch.randperm(len(used), generator=g)[:K]] for _ in range(tokens)])
    ids[0] = torch.tensor([0, E // 2, E - 1])  # token 0 spans the first and last shard of any split
    weights = torch.softmax(torch.randn(tokens, K, generator=g), dim=-1)
    return torch.randn(tokens, H, generator=g).to(dtype), ids, weights


@pytest.mark.parametrize("num_experts, num_shards", [(8, 1), (8, 3), (64, 5), (5, 5)])
def test_shard_ranges_are_contiguous_balanced_and_cover_every_expert(num_experts, num_shards):
    ranges = [shard_range(num_experts, i, num_shards) for i in range(num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_experts
    assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_shards_than_experts_is_an_error():
    with pytest.raises(ValueError, match="would hold none"):
        shard_range(4, 0, 5)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
@pytest.mark.parametrize("quant", [None, "q8:g32", "q4:g32"])
def test_partials_over_shards_sum_to_the_full_forward(quant, num_shards):
    experts = make_experts(0, quant)
    x, ids, weights = make_step(1, tokens=6)
    expected = experts(x, ids, weights)
    partials = [shard.partial(x, ids, weights) for shard in build_shards(experts, num_shards, sliced=True)]
    assert all(p.dtype == torch.float32 and p.shape == x.shape for p in partials)
    torch.testing.assert_close(sum(partials), expected, rtol=1e-6, atol=1e-6)  # fp32: only the summation order differs


def test_a_shard_contributes_nothing_for_tokens_routed_elsewhere():
    experts = make_experts(0)
    x, ids, weights = make_step(1, tokens=4)
    ids[1:] = torch.tensor([0, 1, 2])  # tokens 1..3 use only shard 0 of 2 ([0, 4) and [4, 8))
    second = ExpertShard(experts, 1, 2).partial(x, ids, weights)
    assert torch.count_nonzero(second[1:]) == 0 and torch.count_nonzero(second[0]) > 0


def test_bf16_partials_sum_to_the_forward_rounded_once():
    experts = make_experts(0).to(torch.bfloat16)
    x, ids, weights = make_step(1, tokens=6, dtype=torch.bfloat16)
    total = sum(shard.partial(x, ids, weights) for shard in build_shards(experts, 3))
    torch.testing.assert_close(total.to(torch.bfloat16), experts(x, ids, weights), rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("quant", [None, "q4:g32"])
def test_sliced_shard_holds_only_its_experts(quant):
    experts = make_experts(0, quant)
    full = ExpertShard(experts, 0, 1).weight_nbytes
    shard = ExpertShard(experts, 1, 4)
    assert shard.weight_nbytes == full  # views keep the whole stack alive ...
    assert shard.slice_weights().weight_nbytes == full * 2 // E  # ... a sliced shard keeps experts [2, 4) only
    assert (shard.start, shard.stop) == (2, 4)


def layer_experts(seed: int, num_layers: int) -> list[StackedExperts]:
    return [make_experts(seed + layer) for layer in range(num_layers)]


def run_steps(exchange, leader_shards, alive, reference, steps):
    """Drive every (step, layer) through the exchange; each result must equal that layer's full forward."""
    for step, tokens in enumerate(steps):
        for layer, (own, experts) in enumerate(zip(leader_shards, reference)):
            x, ids, weights = make_step(100 * step + layer, tokens)
            out = exchange.run_layer(layer, x, ids, weights, own, alive, timeout_s=10)
            torch.testing.assert_close(out, experts(x, ids, weights), rtol=1e-6, atol=1e-6)


def thread_followers(exchange, shards_by_layer, stop, skip=()):
    threads = []
    for index in range(1, exchange.descriptor.num_shards):
        if index in skip:
            continue
        follower = exchange.follower(index)

        def compute(step, index=index):
            return shards_by_layer[step.layer][index].partial(step.x, step.topk_ids, step.topk_weights)

        threads.append(threading.Thread(target=follower.serve, args=(compute, stop), daemon=True))
        threads[-1].start()
    return threads


def test_exchange_with_thread_followers_matches_full_forward_over_layers_and_steps():
    reference = layer_experts(10, num_layers=3)
    shards = [build_shards(experts, 3, sliced=True) for experts in reference]
    stop = threading.Event()
    with ShardExchange.create(3, max_tokens=8, hidden_size=H, top_k=K, dtype=torch.float32) as exchange:
        threads = thread_followers(exchange, shards, stop)
        run_steps(exchange, [s[0] for s in shards], lambda shard: True, reference, steps=[1, 8, 3, 1])
    for thread in threads:
        thread.join(timeout=5)  # close() tells followers to stop
        assert not thread.is_alive()


def test_oversized_or_misshaped_step_is_a_clear_error():
    with ShardExchange.create(2, max_tokens=4, hidden_size=H, top_k=K, dtype=torch.bfloat16) as exchange:
        x, ids, weights = make_step(0, tokens=5, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="5 tokens; this exchange holds 1 to 4"):
            exchange.publish(0, x, ids, weights)
        with pytest.raises(ValueError, match="bfloat16"):
            exchange.publish(0, x[:2].float(), ids[:2], weights[:2])
        with pytest.raises(ValueError, match="topk_ids"):
            exchange.publish(0, x[:2], ids[:2, :2], weights[:2, :2])


def test_dead_or_silent_follower_raises_shard_worker_died_naming_it():
    reference = layer_experts(10, num_layers=1)
    shards = [build_shards(reference[0], 3)]
    x, ids, weights = make_step(0, tokens=2)
    stop = threading.Event()
    with ShardExchange.create(3, max_tokens=4, hidden_size=H, top_k=K, dtype=torch.float32) as exchange:
        thread_followers(exchange, shards, stop, skip=(2,))  # shard 2 never answers
        started = time.perf_counter()
        with pytest.raises(ShardWorkerDied, match="shard 2 died") as died:
            exchange.run_layer(0, x, ids, weights, shards[0][0], alive=lambda shard: shard != 2, timeout_s=10)
        assert died.value.shard == 2 and time.perf_counter() - started < 1.0
        with pytest.raises(RuntimeError, match="broken"):
            exchange.publish(0, x, ids, weights)
    with ShardExchange.create(3, max_tokens=4, hidden_size=H, top_k=K, dtype=torch.float32) as exchange:
        thread_followers(exchange, shards, stop, skip=(2,))
        with pytest.raises(ShardWorkerDied, match="shard 2 did not finish its partial within 0.2 s"):
            exchange.run_layer(0, x, ids, weights, shards[0][0], alive=lambda shard: True, timeout_s=0.2)
    stop.set()


def test_descriptor_survives_msgpack_and_close_removes_the_segment():
    exchange = ShardExchange.create(2, max_tokens=4, hidden_size=H, top_k=K, dtype=torch.float32)
    wire = msgpack.unpackb(msgpack.packb(exchange.descriptor.as_dict()))
    attached = ShardExchange.attach(wire)
    assert attached.descriptor == exchange.descriptor
    attached.close()
    exchange.close()
    assert not (SHM_DIR / exchange.descriptor.name).exists()
    with pytest.raises(FileNotFoundError):
        ShardExchange.attach(wire)


# Multi-process: spawned followers rebuild the same experts from the seed and keep only their slice.
SEED, NUM_LAYERS = 20, 2


def serve_expert_shard(ctx, descriptor: dict, shard_index: int):
    torch.set_num_threads(1)  # three processes on two cores
    shards = [ExpertShard(e, shard_index, 3).slice_weights() for e in layer_experts(SEED, NUM_LAYERS)]
    exchange = ShardExchange.attach(descriptor)
    follower = exchange.follower(shard_index)
    ctx.ready({"experts": [shards[0].start, shards[0].stop]})
    follower.serve(lambda step: shards[step.layer].partial(step.x, step.topk_ids, step.topk_weights), ctx.stop)
    exchange.close()


@pytest.fixture(scope="module")
def process_pool():
    exchange = ShardExchange.create(3, max_tokens=8, hidden_size=H, top_k=K, dtype=torch.float32)
    workers = {
        i: spawn_worker(serve_expert_shard, f"expert-shard-{i}", f"cpu-decode-{i}", (exchange.descriptor.as_dict(), i))
        for i in (1, 2)
    }
    for worker in workers.values():
        worker.wait_ready(READY_TIMEOUT_S)
    yield exchange, workers
    for worker in workers.values():
        worker.terminate(timeout=2)
    exchange.close()


def test_exchange_with_follower_processes_matches_full_forward(process_pool):
    exchange, workers = process_pool
    reference = layer_experts(SEED, NUM_LAYERS)
    alive = pids_alive({i: w.pid for i, w in workers.items()})
    run_steps(exchange, [ExpertShard(e, 0, 3) for e in reference], alive, reference, steps=[1, 5, 8, 1])


def test_killed_follower_process_makes_leader_raise_within_a_second(process_pool):
    exchange, workers = process_pool  # runs last: it leaves the pool broken
    reference = layer_experts(SEED, NUM_LAYERS)
    alive = pids_alive({i: w.pid for i, w in workers.items()})
    run_steps(exchange, [ExpertShard(e, 0, 3) for e in reference], alive, reference, steps=[1])
    os.kill(workers[2].pid, signal.SIGKILL)
    x, ids, weights = make_step(7, tokens=2)
    started = time.perf_counter()
    with pytest.raises(ShardWorkerDied, match="shard 2") as died:
        exchange.run_layer(0, x, ids, weights, ExpertShard(reference[0], 0, 3), alive, timeout_s=30)
    assert died.value.shard == 2 and time.perf_counter() - started < 1.0
