"""Real `krasis-ctl serve` processes on loopback, started the way the README says, and raw HTTP helpers."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.models.tiny_checkpoints import build_checkpoint

STARTUP_TIMEOUT_S = 90.0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_checkpoint("qwen3_moe-base", tmp_path_factory.mktemp("server") / "tiny-qwen3-moe")


class ServerProcess:
    """One `krasis-ctl serve` subprocess; its output goes to a log file shown when something fails."""

    def __init__(self, args: list[str], work_dir: Path):
        self.port = free_port()
        self.log_path = work_dir / "server.log"
        env = {**os.environ, "KRASIS_HOME": str(work_dir / "home"), "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        command = krasis_ctl() + ["serve", "--port", str(self.port), *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_healthy()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; returns the exit status (killing it if it hangs, which fails the caller)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log()}")


def krasis_ctl() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "krasis-ctl")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "krasis.ctl"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(server: ServerProcess, method: str, path: str, body=None, headers: dict | None = None,
            timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """(status, headers, raw body); `body` is sent as JSON unless it is bytes already."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(server: ServerProcess, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    status, _, raw = request(server, "POST", path, body, headers)
    return status, json.loads(raw)


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, asserting the framing: every event is one data line + blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: "):] for event in events]


def metric(server: ServerProcess, name: str) -> float:
    """One sample of /metrics, e.g. `krasis_kv_pages_in_use` or `krasis_sequences_finished_total{reason="abort"}`."""
    _, _, raw = request(server, "GET", "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    assert "{" in name, f"/metrics has no {name}"
    return 0.0  # a labelled counter appears once it first counts
