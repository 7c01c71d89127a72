"""The pipeline server end to end: real worker processes, the official openai client, worker deaths, shutdown."""

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner
from openai import AsyncOpenAI, OpenAI

from krasis.common.shm_segments import cleanup_stale
from krasis.ctl.main import cli
from krasis.gateway.worker_groups import PipelineConfig
from tests.models.tiny_checkpoints import build_checkpoint
from tests.pipeline.conftest import shm_segments, start_pipeline, worker_pids
from tests.server.conftest import metric

PROMPTS = ["def add(a, b):\n    return a + b", "The capital of France is"]
MAX_TOKENS = 12
HEARTBEAT_TIMEOUT_S = PipelineConfig.heartbeat_timeout_s  # serve's default


def generate_cli(model_dir, prompt: str, max_tokens: int) -> dict:
    args = ["generate", "--json", "--dtype", "fp32", "--model", str(model_dir), "--prompt", prompt,
            "--max-tokens", str(max_tokens), "--ignore-eos"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> dict[str, dict]:
    """`krasis-ctl generate --json` of each prompt: token_ids, text, finish_reason."""
    return {p: generate_cli(tiny_model_dir, p, MAX_TOKENS) for p in PROMPTS}


def openai_client(server) -> OpenAI:
    return OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=30)


def model_name(client) -> str:
    return client.models.list().data[0].id


def health_status(server) -> int:
    try:
        with urllib.request.urlopen(server.url("/health"), timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def complete_ids(client, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    out = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert out.choices[0].finish_reason == "length"
    return out.choices[0].model_dump()["token_ids"]


# 4 workers on CI's 2 cores: start_pipeline passes --oversubscribe (they share the cores; same tokens, slower).
@pytest.mark.parametrize("cpu_workers", [1, 2, 4])
def test_greedy_output_equals_generate_cli(servers, expected, cpu_workers):
    client = openai_client(servers(cpu_workers))
    for prompt in PROMPTS:
        assert complete_ids(client, prompt) == expected[prompt]["token_ids"], prompt


@pytest.fixture(scope="module")
def hybrid_model_dir(tmp_path_factory):
    return build_checkpoint("qwen3_next-base", tmp_path_factory.mktemp("hybrid") / "tiny-qwen3-next")


def test_hybrid_model_through_two_decode_workers_equals_generate_cli(hybrid_model_dir, tmp_path):
    """Gated DeltaNet state goes prefill worker -> shared pool -> decode leader, per request in its own slot."""
    expected = {p: generate_cli(hybrid_model_dir, p, MAX_TOKENS)["token_ids"] for p in PROMPTS}
    server = start_pipeline(hybrid_model_dir, tmp_path, 2)
    try:
        client = openai_client(server)
        prompts = PROMPTS * 3  # six at once: six state slots in use together
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: complete_ids(client, p), prompts))
        assert got == [expected[p] for p in prompts]
    finally:
        server.stop()


def test_worker_process_titles_are_visible_in_cmdline(servers):
    titles = set(worker_pids(servers(2)))
    assert titles == {"krasis::gpu-prefill-0", "krasis::cpu-decode-0", "krasis::cpu-decode-1"}


def test_32_concurrent_streams_all_complete_with_the_same_tokens(servers, expected):
    server = servers(2)

    async def stream(client, prompt: str) -> tuple[str, list[str]]:
        text, reasons = "", []
        chunks = await client.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in chunks:
            text += chunk.choices[0].text
            reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        return text, reasons

    async def run_all():
        client = AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)
        prompts = (PROMPTS * 32)[:32]
        results = await asyncio.wait_for(asyncio.gather(*(stream(client, p) for p in prompts)), 90)
        await client.close()
        return prompts, results

    prompts, results = asyncio.run(run_all())
    for prompt, (text, reasons) in zip(prompts, results):
        assert text == expected[prompt]["text"] and reasons == ["length"]


def long_stream_under_way(server):
    """(client, chunk iterator) of a 230-token greedy stream whose first chunk has arrived."""
    client = openai_client(server)
    stream = client.completions.create(model=model_name(client), prompt=PROMPTS[0], max_tokens=230, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    chunks = iter(stream)
    next(chunks)
    return client, chunks


@pytest.mark.parametrize("cpu_workers,title", [(2, "krasis::cpu-decode-1"), (1, "krasis::gpu-prefill-0")])
def test_killing_a_worker_mid_stream_errors_then_the_restarted_worker_serves(servers, expected, cpu_workers, title):
    server = servers(cpu_workers)
    victim = worker_pids(server)[title]
    client, chunks = long_stream_under_way(server)
    os.kill(victim, signal.SIGKILL)
    killed_at, finish = time.monotonic(), None
    with pytest.raises(Exception) as failure:  # the SSE error event: openai raises APIError from the stream
        for chunk in chunks:
            finish = chunk.choices[0].finish_reason or finish
    assert finish is None, "the stream ended normally before the worker died"
    assert time.monotonic() - killed_at < 2.0
    assert "died" in str(failure.value)
    assert health_status(server) == 503
    wait_until_healthy(server)
    assert worker_pids(server)[title] != victim
    assert complete_ids(client, PROMPTS[1]) == expected[PROMPTS[1]]["token_ids"]
    wait_until_no_kv_pages_in_use(server)  # the failed stream's pages came back once both workers confirmed


# The decode leader stops mid-step; a stopped follower leaves the leader waiting for its partial sums.
@pytest.mark.parametrize("cpu_workers,title", [(1, "krasis::cpu-decode-0"), (2, "krasis::cpu-decode-1")])
def test_a_stopped_worker_is_found_hung_its_stream_errors_and_it_is_restarted(servers, expected, cpu_workers, title):
    server = servers(cpu_workers)
    victim = worker_pids(server)[title]
    client, chunks = long_stream_under_way(server)
    os.kill(victim, signal.SIGSTOP)  # alive to the supervisor, silent to the heartbeat monitor
    stopped_at = time.monotonic()
    with pytest.raises(Exception) as failure:
        for _ in chunks:
            pass
    assert time.monotonic() - stopped_at < HEARTBEAT_TIMEOUT_S + 2.0
    assert "hung" in str(failure.value) and "heartbeat" in str(failure.value)
    assert health_status(server) == 503
    wait_until_healthy(server)
    assert worker_pids(server)[title] != victim and not os.path.exists(f"/proc/{victim}")
    assert complete_ids(client, PROMPTS[1]) == expected[PROMPTS[1]]["token_ids"]
    wait_until_no_kv_pages_in_use(server)


def wait_until_healthy(server, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health_status(server) != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)


def test_client_disconnect_frees_kv_pages(servers):
    server = servers(1)
    client = openai_client(server)
    stream = client.completions.create(model=model_name(client), prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(stream))
    assert metric(server, "krasis_kv_pages_in_use") > 0
    stream.close()
    wait_until_no_kv_pages_in_use(server)


def wait_until_no_kv_pages_in_use(server, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(server, "krasis_kv_pages_in_use") != 0:
        assert time.monotonic() < deadline, "an ended request's KV pages were not freed"
        time.sleep(0.05)


def test_sigterm_stops_every_worker_and_removes_shared_memory(servers):
    server = servers(1)
    pids = list(worker_pids(server).values())
    assert pids and shm_segments(server.proc.pid)
    assert server.stop() == 0
    assert shm_segments(server.proc.pid) == []
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_a_killed_gateway_leaves_no_worker_behind(servers):
    server = servers(2)
    pids = list(worker_pids(server).values())
    segments = shm_segments(server.proc.pid)
    assert len(pids) == 3 and len(segments) == 2  # the KV pool and the expert exchange
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 5  # workers stop on PDEATHSIG
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    # what SIGKILL cannot clean, the next gateway's start removes (cleanup_stale of its prefixes)
    removed = cleanup_stale("krasis-kv") + cleanup_stale("krasis-experts")
    assert sorted(segments) == sorted(n for n in removed if n in segments)
