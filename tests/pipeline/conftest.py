"""Real pipeline servers (gateway + GPU-prefill worker on the CPU + CPU decode pool) on loopback."""

import os
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, tiny_model_dir  # noqa: F401  (session fixture: the checkpoint)

SHM_PREFIXES = ("krasis-kv-", "krasis-experts-")


def start_pipeline(model_dir: Path, work_dir: Path, cpu_workers: int) -> ServerProcess:
    # --oversubscribe: 4 workers on CI's 2 cores share them (the plan is unchanged where the cores suffice)
    return ServerProcess(["--model", str(model_dir), "--dtype", "fp32", "--gpu", "none", "--oversubscribe",
                          "--cpu-workers", str(cpu_workers), "--max-concurrency", "8"], work_dir)  # fmt: skip


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """{cpu workers: server}, started on first use, stopped (SIGTERM) at the end of the module."""
    started: dict[int, ServerProcess] = {}

    def get(cpu_workers: int) -> ServerProcess:
        if cpu_workers not in started:
            work_dir = tmp_path_factory.mktemp(f"pipeline-{cpu_workers}")
            started[cpu_workers] = start_pipeline(tiny_model_dir, work_dir, cpu_workers)
        return started[cpu_workers]

    yield get
    for server in started.values():
        server.stop()


def worker_pids(server: ServerProcess) -> dict[str, int]:
    """{title: pid} of the gateway's children, read from /proc/<pid>/cmdline."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.proc.pid and cmdline.startswith("krasis::"):
            found[cmdline] = int(entry.name)
    return found


def shm_segments(owner_pid: int) -> list[str]:
    """Our /dev/shm segments owned by `owner_pid` (their names carry it)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES) and f"-{owner_pid}-" in n]
