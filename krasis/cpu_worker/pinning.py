"""Pins a CPU decode worker to its placement: CPU affinity, torch thread count and, on hosts
with several NUMA nodes, a memory policy on the worker's node."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass

from krasis.common.process import set_torch_threads
from krasis.common.topology import WorkerPlacement, numa_node_ids

log = logging.getLogger("krasis.cpu_worker")

MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
_POLICY_NAMES = {MPOL_DEFAULT: "default", MPOL_PREFERRED: "preferred", MPOL_BIND: "bind"}
# glibc has no wrapper for these (libnuma does); numbers from the kernel's syscall tables
_SYSCALL_NUMBERS = {
    "x86_64": {"set_mempolicy": 238, "get_mempolicy": 239},
    "aarch64": {"set_mempolicy": 237, "get_mempolicy": 236},
}
_MASK_BITS = 1024  # nodemask width passed to the kernel; covers MAX_NUMNODES on every distro kernel
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8


@dataclass(frozen=True)
class AppliedPinning:
    """What pinning actually did, read back from the kernel, for the worker's ready handshake."""

    cpus: tuple[int, ...]
    threads: int
    memory_policy: str  # "default" when memory was not bound
    memory_nodes: tuple[int, ...]
    warning: str | None = None


def _syscall(name: str, *args) -> int:
    """0, or the errno of a failed syscall; ENOSYS where the number is unknown."""
    number = _SYSCALL_NUMBERS.get(platform.machine(), {}).get(name)
    if number is None:
        return 38  # ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(number), *args) == 0:
        return 0
    return ctypes.get_errno()


def bind_memory_to_node(node: int, strict: bool = True) -> str | None:
    """Set this process's memory policy to `node` for all later allocations (MPOL_BIND when
    strict, else MPOL_PREFERRED). Returns a warning instead of raising: an unbound worker
    still decodes correctly, only slower."""
    if not 0 <= node < _MASK_BITS:
        return f"memory not bound: node {node} is outside the {_MASK_BITS}-node mask"
    mask = (ctypes.c_ulong * (_MASK_BITS // _ULONG_BITS))()
    mask[node // _ULONG_BITS] = 1 << (node % _ULONG_BITS)
    mode = MPOL_BIND if strict else MPOL_PREFERRED
    # the kernel reads maxnode - 1 bits, hence the + 1
    errno = _syscall("set_mempolicy", ctypes.c_int(mode), mask, ctypes.c_ulong(_MASK_BITS + 1))
    if errno == 0:
        return None
    warning = (
        f"memory not bound to NUMA node {node}: set_mempolicy({_POLICY_NAMES[mode]}) failed "
        f"with errno {errno} ({os.strerror(errno)}); decode may read remote memory"
    )
    log.warning(warning)
    return warning


def read_memory_policy() -> tuple[str, tuple[int, ...]]:
    """This process's memory policy and its nodes, as the kernel reports them."""
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * (_MASK_BITS // _ULONG_BITS))()
    errno = _syscall("get_mempolicy", ctypes.byref(mode), mask, ctypes.c_ulong(_MASK_BITS + 1),
                     ctypes.c_void_p(0), ctypes.c_ulong(0))
    if errno != 0:
        return "unknown", ()
    nodes = tuple(i for i in range(_MASK_BITS) if mask[i // _ULONG_BITS] >> (i % _ULONG_BITS) & 1)
    base_mode = mode.value & 0xFF  # high bits are MPOL_F_* flags
    return _POLICY_NAMES.get(base_mode, str(base_mode)), nodes


def pin_current_process(
    placement: WorkerPlacement, bind_memory: bool, *, strict: bool = True, sysfs_root: str = "/sys"
) -> AppliedPinning:
    """Pin this process to `placement` before it loads anything, so its memory lands on its node.

    Memory is bound only where the host has several NUMA nodes; a failed bind is a warning.
    """
    os.sched_setaffinity(0, placement.cpus)
    import torch  # lazily: the topology plan and tests of it need no torch

    set_torch_threads(placement.threads)
    warning = None
    if bind_memory and len(numa_node_ids(sysfs_root)) > 1:
        warning = bind_memory_to_node(placement.node, strict)
    policy, nodes = read_memory_policy()
    return AppliedPinning(
        cpus=tuple(sorted(os.sched_getaffinity(0))),
        threads=torch.get_num_threads(),
        memory_policy=policy,
        memory_nodes=nodes,
        warning=warning,
    )
