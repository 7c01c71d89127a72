"""Typed ZeroMQ queues on real sockets: ipc:// and tcp://, garbage dropped, asyncio, a second process."""

import asyncio
import logging
import multiprocessing
import os
import time

import msgpack
import pytest
import torch
import zmq

from krasis.common.protocol_pipeline import AbortRequest, HandOff, Heartbeat, Shutdown, WorkerRole
from krasis.common.sampling_params import SamplingParams
from krasis.common.zmq_queues import (
    AsyncPullQueue,
    AsyncPushQueue,
    PubQueue,
    PullQueue,
    PushQueue,
    SubQueue,
    ipc_endpoint,
)

TIMEOUT = 5.0  # generous: only reached when the behaviour is broken


def kv_handoff(request_id: str = "r") -> HandOff:
    kv = torch.arange(64 * 1024, dtype=torch.float32).reshape(1024, 64).to(torch.bfloat16)
    return HandOff(request_id, [1, 2, 3], 2, [0], SamplingParams(seed=1), [kv])


def test_push_pull_over_ipc_delivers_messages_in_order(tmp_path):
    endpoint = ipc_endpoint(tmp_path, "prefill")
    with PullQueue(endpoint, bind=True) as pull, PushQueue(endpoint, bind=False) as push:
        sent = [AbortRequest(f"r{i}") for i in range(100)]
        for msg in sent:
            push.put(msg)
        assert [pull.get(TIMEOUT) for _ in sent] == sent
        assert pull.dropped == 0 and push.socket.getsockopt(zmq.LINGER) == 0


def test_tcp_ephemeral_port_carries_tensor_frames():
    with PullQueue("tcp://127.0.0.1:*", bind=True) as pull:
        assert pull.endpoint.startswith("tcp://127.0.0.1:") and not pull.endpoint.endswith("*")
        with PushQueue(pull.endpoint, bind=False) as push:
            sent = kv_handoff()
            push.put(sent)
            got = pull.get(TIMEOUT)
    assert got.request_id == "r" and torch.equal(got.kv_layers[0], sent.kv_layers[0])


def test_get_waits_at_most_its_timeout(tmp_path):
    with PullQueue(ipc_endpoint(tmp_path, "idle"), bind=True) as pull:
        assert pull.get_nowait() is None
        start = time.monotonic()
        assert pull.get(0.1) is None
        assert 0.08 <= time.monotonic() - start < 1.0


def test_put_times_out_when_no_peer_takes_it(tmp_path):
    with PushQueue(ipc_endpoint(tmp_path, "nobody"), bind=True) as push:
        with pytest.raises(TimeoutError, match="could not send within 0.1 s"):
            push.put(Shutdown(), timeout=0.1)


GARBAGE = [
    [b"\xc1"],  # a byte msgpack never uses
    [msgpack.packb([99, "x"])],  # unknown tag
    [msgpack.packb([2, 12345])],  # AbortRequest with an int id
    [msgpack.packb([2, 67890])],  # same kind again: counted, not logged
    [msgpack.packb([2, "r"]), b"stray frame"],
    [b""],  # invalid msgpack again
]


def test_pull_queue_drops_garbage_and_delivers_the_next_good_message(tmp_path, caplog):
    endpoint = ipc_endpoint(tmp_path, "gateway")
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    with PullQueue(endpoint, bind=True) as pull, caplog.at_level(logging.WARNING, logger="krasis.zmq"):
        raw.connect(endpoint)
        for frames in GARBAGE:
            raw.send_multipart(frames)
        raw.send_multipart([msgpack.packb([2, "good"])])
        assert pull.get(TIMEOUT) == AbortRequest("good")
        assert pull.dropped == len(GARBAGE)
    raw.close()
    warnings = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert len(warnings) == 4  # one line per kind of fault: msgpack, tag, field, frames
    assert any("AbortRequest.request_id: expected str, got int" in r.getMessage() for r in warnings)


def test_pub_sub_reaches_every_subscriber(tmp_path):
    endpoint = ipc_endpoint(tmp_path, "decode-pool")
    with PubQueue(endpoint, bind=True) as pub, SubQueue(endpoint, False) as sub0, SubQueue(endpoint, False) as sub1:
        for sub in (sub0, sub1):  # subscriptions propagate asynchronously: probe until each one hears
            deadline = time.monotonic() + TIMEOUT
            while sub.get(0.01) is None and time.monotonic() < deadline:
                pub.put(Heartbeat(WorkerRole.GPU_PREFILL, 0, 0, 0, 0.0))
        pub.put(kv_handoff("broadcast"))
        for sub in (sub0, sub1):
            msg = sub.get(TIMEOUT)
            while isinstance(msg, Heartbeat):
                msg = sub.get(TIMEOUT)
            assert isinstance(msg, HandOff) and msg.request_id == "broadcast"


def test_async_queues_work_in_an_event_loop(tmp_path):
    async def exchange():
        with AsyncPullQueue(ipc_endpoint(tmp_path, "tokens"), bind=True) as pull:
            with AsyncPushQueue(pull.endpoint, bind=False) as apush, PushQueue(pull.endpoint, bind=False) as push:
                assert await pull.get(0.05) is None
                waiter = asyncio.ensure_future(pull.get(TIMEOUT))
                await asyncio.sleep(0.01)
                assert not waiter.done()  # get() yields to the loop while it waits
                await apush.put(AbortRequest("from-async"))
                push.put(kv_handoff("from-worker"))  # a worker's blocking queue feeding the gateway
                first = await waiter
                second = await pull.get(TIMEOUT)
                return first, second

    first, second = asyncio.run(exchange())
    assert first == AbortRequest("from-async")
    assert isinstance(second, HandOff) and second.kv_layers[0].dtype == torch.bfloat16


def report_ready(endpoint: str) -> None:
    """Child process: a worker's heartbeat to the gateway, then a hand-off of a bf16 tensor."""
    push = PushQueue(endpoint, bind=False)
    push.put(Heartbeat(WorkerRole.CPU_DECODE, 1, os.getpid(), 2, 0.5))
    push.put(kv_handoff("from-child"))
    push.put(Shutdown())
    push.close(linger_s=TIMEOUT)  # last words: let them reach the parent before exiting


def test_a_worker_in_another_process_reports_over_ipc(tmp_path):
    endpoint = ipc_endpoint(tmp_path, "supervisor")
    with PullQueue(endpoint, bind=True) as pull:
        child = multiprocessing.get_context("spawn").Process(target=report_ready, args=(endpoint,))
        child.start()
        try:
            ready, handoff, shutdown = (pull.get(60.0) for _ in range(3))  # spawn re-imports torch
        finally:
            child.join(60.0)
    assert child.exitcode == 0
    assert isinstance(ready, Heartbeat) and ready.pid == child.pid and ready.busy_s == 0.5
    assert torch.equal(handoff.kv_layers[0], kv_handoff().kv_layers[0]) and shutdown == Shutdown()


def test_endpoints_are_checked_up_front(tmp_path):
    assert ipc_endpoint(tmp_path, "cpu-decode-0") == f"ipc://{tmp_path}/cpu-decode-0.sock"
    with pytest.raises(ValueError, match="over 107 bytes"):
        ipc_endpoint(tmp_path / ("d" * 120), "x")
    with pytest.raises(ValueError, match="endpoint name"):
        ipc_endpoint(tmp_path, "../escape")
    with pytest.raises(ValueError, match="must start with one of"):
        PullQueue("udp://127.0.0.1:9", bind=True)
    with PullQueue("tcp://127.0.0.1:*", bind=True) as taken:
        with pytest.raises(OSError, match=f"cannot bind {taken.endpoint}: Address already in use"):
            PullQueue(taken.endpoint, bind=True)
