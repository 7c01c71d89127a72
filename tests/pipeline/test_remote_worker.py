"""A CPU decode pool started by `krasis-ctl worker` joins a gateway over tcp:// (loopback standing in for
another host): the prompt KV travels over ZeroMQ, greedy output equals generate, and its death is supervised."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.pipeline.test_pipeline_server import (  # noqa: F401  (expected: a fixture)
    PROMPTS, complete_ids, expected, health_status, model_name, openai_client,
)
from tests.server.conftest import ServerProcess, free_port, krasis_ctl

pytestmark = pytest.mark.slow  # a gateway plus a remote pool, and a re-join after a kill: ~40 s on 2 cores


class RemoteWorker:
    """One `krasis-ctl worker --gateway tcp://...` subprocess; it keeps trying to join until the gateway listens."""

    def __init__(self, gateway: str, model_dir: Path, work_dir: Path):
        self.log_path = work_dir / "worker.log"
        env = {**os.environ, "KRASIS_HOME": str(work_dir / "home"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = krasis_ctl() + ["worker", "--gateway", gateway, "--model", str(model_dir), "--cpu-workers", "1",
                                  "--listen", "tcp://127.0.0.1:0"]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def children(self) -> dict[str, int]:
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and cmdline.startswith("krasis::"):
                found[cmdline] = int(entry.name)
        return found

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


@pytest.fixture(scope="module")
def remote(tiny_model_dir, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("remote")
    gateway = f"tcp://127.0.0.1:{free_port()}"
    worker = RemoteWorker(gateway, tiny_model_dir, work_dir)
    try:
        server = ServerProcess(["--model", str(tiny_model_dir), "--dtype", "fp32", "--gpu", "none",
                                "--remote-workers", gateway, "--max-concurrency", "8"], work_dir)  # fmt: skip
    except Exception:
        worker.stop()
        raise
    yield server, worker
    assert server.stop() == 0
    assert worker.stop() == 0, worker.log_path.read_text()


def wait_healthy(server, timeout_s: float) -> float:
    start = time.monotonic()
    while health_status(server) != 200:
        assert time.monotonic() - start < timeout_s, server.log()
        time.sleep(0.1)
    return time.monotonic() - start


def test_greedy_output_through_a_remote_pool_equals_generate_cli(remote, expected):
    server, _ = remote
    client = openai_client(server)
    for prompt in PROMPTS:
        assert complete_ids(client, prompt) == expected[prompt]["token_ids"], prompt


def test_remote_pool_death_ends_streams_with_an_error_and_it_rejoins(remote, expected):
    server, worker = remote
    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=30)
    stream = client.completions.create(model=model_name(client), prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(stream))  # decoding on the remote pool now
    os.kill(worker.children()["krasis::cpu-decode-0"], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(Exception) as error:
        for _ in stream:
            pass
    assert time.monotonic() - killed < 2.0 and "cpu-decode" in str(error.value), error.value
    assert health_status(server) == 503
    wait_healthy(server, 60.0)  # the worker tears its session down and joins again
    assert complete_ids(openai_client(server), PROMPTS[1]) == expected[PROMPTS[1]]["token_ids"]
