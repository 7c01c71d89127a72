"""Host CPU topology read from sysfs (NUMA nodes, L3 domains, physical cores) and the plan
that places CPU decode workers on it."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Literal, Union

PlanMode = Union[Literal["auto", "node", "ccd"], int]


@dataclass(frozen=True)
class L3Domain:
    """CPUs sharing one last-level cache: a CCD on EPYC, usually a whole socket elsewhere."""

    cpus: tuple[int, ...]
    physical_cores: tuple[tuple[int, ...], ...]  # each core's hyperthread siblings


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node: its usable CPUs grouped by L3 domain, and its RAM."""

    id: int
    cpus: tuple[int, ...]
    l3_domains: tuple[L3Domain, ...]
    mem_bytes: int

    @property
    def physical_cores(self) -> tuple[tuple[int, ...], ...]:
        return tuple(core for domain in self.l3_domains for core in domain.physical_cores)


@dataclass(frozen=True)
class CpuTopology:
    """The CPUs this process may use, by NUMA node; nodes left with none are dropped."""

    nodes: tuple[NumaNode, ...]

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted(cpu for node in self.nodes for cpu in node.cpus))

    @property
    def physical_cores(self) -> tuple[tuple[int, ...], ...]:
        return tuple(core for node in self.nodes for core in node.physical_cores)

    @property
    def num_l3_domains(self) -> int:
        return sum(len(node.l3_domains) for node in self.nodes)


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one CPU decode worker runs: its NUMA node, affinity mask and thread count."""

    index: int
    node: int
    cpus: tuple[int, ...]  # every CPU of its cores, hyperthread siblings included
    threads: int  # one per physical core: siblings share a core's load/store bandwidth


# ---- cpulist syntax ("0-3,8-11,16") ----

def parse_cpulist(text: str) -> tuple[int, ...]:
    """Sorted unique CPU ids of a kernel cpulist; an empty list is valid (memory-only nodes)."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"bad cpulist {text!r}: {part!r} is not N or N-M")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"bad cpulist {text!r}: range {part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of parse_cpulist: runs of consecutive ids as ranges."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- reading sysfs ----

def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def numa_node_ids(root: str | os.PathLike = "/sys") -> tuple[int, ...]:
    """Ids of every NUMA node directory on the host, memory-only nodes included."""
    node_dir = Path(root) / "devices/system/node"
    if not node_dir.is_dir():
        return ()
    names = (re.fullmatch(r"node(\d+)", p.name) for p in node_dir.iterdir())
    return tuple(sorted(int(m.group(1)) for m in names if m))


def _online_cpus(cpu_dir: Path) -> tuple[int, ...]:
    online = _read(cpu_dir / "online")
    if online is not None:
        return parse_cpulist(online)
    names = (re.fullmatch(r"cpu(\d+)", p.name) for p in cpu_dir.iterdir())
    return tuple(sorted(int(m.group(1)) for m in names if m))


def _core_key(cpu_dir: Path, cpu: int) -> Hashable:
    """Equal for the hyperthreads of one physical core."""
    topo = cpu_dir / f"cpu{cpu}/topology"
    for name in ("core_cpus_list", "thread_siblings_list"):
        siblings = _read(topo / name)
        if siblings:
            return ("siblings", parse_cpulist(siblings))
    core_id = _read(topo / "core_id")
    if core_id is not None:
        # core_id is only unique within a die of a package
        return ("id", _read(topo / "physical_package_id"), _read(topo / "die_id"), core_id)
    return ("cpu", cpu)


def _l3_key(cpu_dir: Path, cpu: int) -> tuple[int, ...] | None:
    """The CPUs sharing this CPU's L3 cache, or None where sysfs does not say."""
    cache_dir = cpu_dir / f"cpu{cpu}/cache"
    if not cache_dir.is_dir():
        return None
    for index in sorted(cache_dir.glob("index*")):
        if _read(index / "level") == "3":
            shared = _read(index / "shared_cpu_list")
            return parse_cpulist(shared) if shared else None
    return None


def _node_mem_bytes(node_path: Path) -> int:
    match = re.search(r"MemTotal:\s*(\d+)\s*kB", _read(node_path / "meminfo") or "")
    return int(match.group(1)) * 1024 if match else 0


def _host_mem_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _group(cpus: Iterable[int], key) -> list[tuple[int, ...]]:
    """Split cpus by key, groups ordered by their lowest CPU."""
    groups: dict[Hashable, list[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(key(cpu), []).append(cpu)
    return [tuple(group) for group in groups.values()]


def _build_node(node_id: int, cpus: tuple[int, ...], mem_bytes: int, cpu_dir: Path) -> NumaNode:
    domains = []
    # CPUs without cache info share one domain per node (the key None)
    for domain_cpus in _group(cpus, lambda cpu: _l3_key(cpu_dir, cpu)):
        cores = _group(domain_cpus, lambda cpu: _core_key(cpu_dir, cpu))
        domains.append(L3Domain(cpus=domain_cpus, physical_cores=tuple(cores)))
    return NumaNode(id=node_id, cpus=cpus, l3_domains=tuple(domains), mem_bytes=mem_bytes)


def read_topology(root: str | os.PathLike = "/sys", allowed_cpus: Iterable[int] | None = None) -> CpuTopology:
    """The topology of the CPUs this process may run on (default: its sched_getaffinity)."""
    system = Path(root) / "devices/system"
    cpu_dir = system / "cpu"
    allowed = set(os.sched_getaffinity(0) if allowed_cpus is None else allowed_cpus)
    usable = set(_online_cpus(cpu_dir)) & allowed
    if not usable:
        raise RuntimeError(f"no usable CPU: none of the allowed CPUs {format_cpulist(allowed)} is online")
    node_ids = numa_node_ids(root)
    if node_ids:
        node_cpus = {i: parse_cpulist(_read(system / f"node/node{i}/cpulist") or "") for i in node_ids}
        node_mem = {i: _node_mem_bytes(system / f"node/node{i}") for i in node_ids}
    else:
        node_cpus, node_mem = {0: tuple(usable)}, {0: _host_mem_bytes()}
    nodes = []
    for node_id, cpus in node_cpus.items():
        cpus = tuple(sorted(usable.intersection(cpus)))
        if cpus:
            nodes.append(_build_node(node_id, cpus, node_mem[node_id], cpu_dir))
    return CpuTopology(nodes=tuple(nodes))


# ---- the worker plan ----

def _worker_count(mode: object, num_cores: int, oversubscribe: bool = False) -> int:
    if isinstance(mode, str) and mode.isdigit():
        mode = int(mode)
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise ValueError(f"cpu workers must be 'auto', 'node', 'ccd' or a worker count, got {mode!r}")
    if mode < 1 or (mode > num_cores and not oversubscribe):
        raise ValueError(
            f"cannot run {mode} CPU workers on {num_cores} physical cores: "
            f"the count must be between 1 and {num_cores} (one worker per core at most, unless oversubscribed)"
        )
    return mode


def _group_sizes(node_of: list[int], count: int) -> list[int]:
    """`count` sizes differing by at most one, ordered so the fewest groups straddle two nodes."""
    base, extra = divmod(len(node_of), count)
    inf = len(node_of) + 1

    def straddles(start: int, size: int) -> int:
        return int(node_of[start] != node_of[start + size - 1])

    # fewest[i][e]: straddling groups among groups i.. when e of groups ..i are the larger size
    fewest = [[inf] * (extra + 1) for _ in range(count + 1)]
    fewest[count][extra] = 0
    for i in range(count - 1, -1, -1):
        for e in range(min(i, extra) + 1):
            start = i * base + e
            small = straddles(start, base) + fewest[i + 1][e]
            large = straddles(start, base + 1) + fewest[i + 1][e + 1] if e < extra else inf
            fewest[i][e] = min(small, large)
    sizes, e = [], 0
    for i in range(count):
        start = i * base + e
        take_large = e < extra and straddles(start, base + 1) + fewest[i + 1][e + 1] == fewest[i][e]
        sizes.append(base + take_large)
        e += take_large
    return sizes


def _split_cores(topology: CpuTopology, count: int) -> list[tuple[int, tuple[tuple[int, ...], ...]]]:
    cores = [(node.id, core) for node in topology.nodes for core in node.physical_cores]
    groups, start = [], 0
    for size in _group_sizes([node for node, _ in cores], count):
        chunk = cores[start:start + size]
        # a group that straddles nodes lives on (and binds memory to) the node of most of its cores
        node = Counter(node for node, _ in chunk).most_common(1)[0][0]
        groups.append((node, tuple(core for _, core in chunk)))
        start += size
    return groups


def plan_workers(topology: CpuTopology, mode: PlanMode = "auto", oversubscribe: bool = False) -> list[WorkerPlacement]:
    """One worker per NUMA node ("auto"/"node"), per L3 domain ("ccd"), or N even core groups.

    `oversubscribe` allows a count above the physical cores: the workers then take the cores in turn, one
    thread each, sharing them (for trials and tests of many workers on a small box; every step waits on
    preempted workers, so never for speed).
    """
    if mode in ("auto", "node"):
        groups = [(node.id, node.physical_cores) for node in topology.nodes]
    elif mode == "ccd":
        groups = [(node.id, d.physical_cores) for node in topology.nodes for d in node.l3_domains]
    else:
        count = _worker_count(mode, len(topology.physical_cores), oversubscribe)
        split = _split_cores if count <= len(topology.physical_cores) else _shared_cores
        groups = split(topology, count)
    return [
        WorkerPlacement(index=i, node=node, cpus=tuple(sorted(c for core in cores for c in core)), threads=len(cores))
        for i, (node, cores) in enumerate(groups)
    ]


def _shared_cores(topology: CpuTopology, count: int) -> list[tuple[int, tuple[tuple[int, ...], ...]]]:
    """`count` one-core groups, more than the cores: worker i takes core i mod the core count."""
    cores = [(node.id, core) for node in topology.nodes for core in node.physical_cores]
    return [(cores[i % len(cores)][0], (cores[i % len(cores)][1],)) for i in range(count)]


def describe(placements: list[WorkerPlacement], topology: CpuTopology | None = None) -> str:
    """The topology plan `krasis-ctl serve` prints at start."""
    lines = []
    if topology is not None:
        lines.append(
            f"host: {len(topology.nodes)} NUMA node(s), {topology.num_l3_domains} L3 domain(s), "
            f"{len(topology.physical_cores)} physical cores / {len(topology.cpus)} CPUs usable"
        )
        for node in topology.nodes:
            lines.append(
                f"  node {node.id}: {len(node.physical_cores)} cores in {len(node.l3_domains)} L3 domain(s), "
                f"cpus {format_cpulist(node.cpus)}, {node.mem_bytes / 2**30:.1f} GiB"
            )
    threads = sum(p.threads for p in placements)
    lines.append(f"CPU decode pool: {len(placements)} worker(s), {threads} thread(s)")
    for p in placements:
        lines.append(f"  cpu-decode-{p.index}: node {p.node}, {p.threads} threads, cpus {format_cpulist(p.cpus)}")
    return "\n".join(lines)
