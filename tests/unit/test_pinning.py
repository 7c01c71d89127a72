"""Pinning a CPU decode worker: affinity and threads on this machine, memory binding by syscall."""

import json
import os
import subprocess
import sys

import pytest
import torch

from krasis.common.topology import WorkerPlacement
from krasis.cpu_worker import pinning
from tests.unit.test_topology import make_sysfs

PIN_IN_CHILD = """
import dataclasses, json, os, sys
from krasis.common.topology import WorkerPlacement
from krasis.cpu_worker.pinning import pin_current_process
import torch
applied = pin_current_process(WorkerPlacement(0, 0, (int(sys.argv[1]),), 1), bind_memory=True)
print(json.dumps({"affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "applied": dataclasses.asdict(applied)}))
"""

BIND_IN_CHILD = """
import json, sys
from krasis.cpu_worker.pinning import bind_memory_to_node, read_memory_policy
warning = bind_memory_to_node(0, strict=sys.argv[1] == "bind")
print(json.dumps({"warning": warning, "policy": read_memory_policy()}))
"""

needs_syscalls = pytest.mark.skipif(
    pinning._SYSCALL_NUMBERS.get(os.uname().machine) is None, reason="set_mempolicy number unknown here"
)


def run_child(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def restore_pinning():
    """Pinning tests that run in this process leave its affinity and threads as they found them."""
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield
    os.sched_setaffinity(0, affinity)
    torch.set_num_threads(threads)


def test_pinning_sets_a_child_process_affinity_and_threads():
    parent_affinity = os.sched_getaffinity(0)
    cpu = max(parent_affinity)
    report = run_child(PIN_IN_CHILD, str(cpu))
    assert report["affinity"] == [cpu]
    assert report["threads"] == 1
    assert report["applied"]["cpus"] == [cpu] and report["applied"]["threads"] == 1
    assert os.sched_getaffinity(0) == parent_affinity


@needs_syscalls
@pytest.mark.parametrize("policy", ["bind", "preferred"])
def test_memory_binds_to_a_node_through_set_mempolicy(policy):
    report = run_child(BIND_IN_CHILD, policy)
    if report["warning"] and "errno 1 " in report["warning"]:
        pytest.skip(f"set_mempolicy not permitted here: {report['warning']}")
    assert report["warning"] is None
    assert report["policy"] == [policy, [0]]


@needs_syscalls
def test_failed_memory_bind_is_a_warning_with_the_errno(caplog):
    # no host has node 1000: the kernel refuses with EINVAL and nothing changes
    warning = pinning.bind_memory_to_node(1000)
    assert "errno 22" in warning and "node 1000" in warning
    assert "errno 22" in caplog.text
    assert pinning.read_memory_policy()[0] != "bind"


def test_unknown_architecture_is_a_warning_not_a_crash(monkeypatch):
    monkeypatch.setattr(pinning.platform, "machine", lambda: "riscv64")
    warning = pinning.bind_memory_to_node(0)
    assert "errno 38" in warning


def bind_calls(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(pinning, "bind_memory_to_node", lambda node, strict: calls.append((node, strict)))
    return calls


def test_memory_is_bound_only_on_multi_node_hosts(tmp_path, monkeypatch, restore_pinning):
    calls = bind_calls(monkeypatch)
    placement = WorkerPlacement(0, 1, tuple(sorted(os.sched_getaffinity(0))), 1)
    two_nodes = make_sysfs(tmp_path / "two", nodes=2)
    one_node = make_sysfs(tmp_path / "one", nodes=1)
    applied = pinning.pin_current_process(placement, bind_memory=True, sysfs_root=str(two_nodes))
    pinning.pin_current_process(placement, bind_memory=False, sysfs_root=str(two_nodes))
    pinning.pin_current_process(placement, bind_memory=True, sysfs_root=str(one_node))
    pinning.pin_current_process(placement, bind_memory=True, strict=False, sysfs_root=str(two_nodes))
    assert calls == [(1, True), (1, False)]
    assert applied.cpus == placement.cpus and applied.threads == 1
