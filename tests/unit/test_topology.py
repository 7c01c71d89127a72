"""CPU topology from sysfs and the worker plan, against fake sysfs trees built per test."""

import os
from pathlib import Path

import pytest

from krasis.common.topology import (
    CpuTopology,
    describe,
    format_cpulist,
    parse_cpulist,
    plan_workers,
    read_topology,
)

GIB = 2**30


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def make_sysfs(
    root: Path,
    nodes: int = 2,
    ccds_per_node: int = 2,
    cores_per_ccd: int = 4,
    threads_per_core: int = 2,
    *,
    node_dirs: bool = True,
    cache_info: bool = True,
    sibling_lists: bool = True,
) -> Path:
    """A Linux-like tree: CPU n and n + num_cores are hyperthreads of core n, as on EPYC."""
    num_cores = nodes * ccds_per_node * cores_per_ccd
    system = root / "devices/system"
    write(system / "cpu/online", f"0-{num_cores * threads_per_core - 1}")
    for core in range(num_cores):
        siblings = [core + t * num_cores for t in range(threads_per_core)]
        ccd_first = core - core % cores_per_ccd
        ccd_cores = range(ccd_first, ccd_first + cores_per_ccd)
        ccd_cpus = [c + t * num_cores for t in range(threads_per_core) for c in ccd_cores]
        for cpu in siblings:
            topo = system / f"cpu/cpu{cpu}/topology"
            write(topo / "core_id", str(core % (num_cores // nodes)))
            write(topo / "physical_package_id", str(core // (num_cores // nodes)))
            if sibling_lists:
                write(topo / "thread_siblings_list", format_cpulist(siblings))
                write(topo / "core_cpus_list", format_cpulist(siblings))
            if cache_info:
                for index, (level, shared) in enumerate([(1, siblings), (2, siblings), (3, ccd_cpus)]):
                    write(system / f"cpu/cpu{cpu}/cache/index{index}/level", str(level))
                    write(system / f"cpu/cpu{cpu}/cache/index{index}/shared_cpu_list", format_cpulist(shared))
    if node_dirs:
        per_node = num_cores // nodes
        for node in range(nodes):
            cores = range(node * per_node, (node + 1) * per_node)
            cpus = [c + t * num_cores for t in range(threads_per_core) for c in cores]
            write(system / f"node/node{node}/cpulist", format_cpulist(cpus))
            meminfo = f"Node {node} MemTotal:       {64 * 2**20} kB\nNode {node} MemFree: 1 kB"
            write(system / f"node/node{node}/meminfo", meminfo)
    return root


@pytest.fixture(scope="module")
def epyc(tmp_path_factory) -> CpuTopology:
    """2 sockets x 2 CCDs x 4 cores x 2 threads, every CPU allowed."""
    return read_topology(make_sysfs(tmp_path_factory.mktemp("epyc")), allowed_cpus=range(32))


def siblings_paired(cpus) -> bool:
    return all((cpu + 16) % 32 in cpus for cpu in cpus)


# ---- cpulist syntax ----

@pytest.mark.parametrize(
    "text, cpus",
    [
        ("0-3,8-11,16", (0, 1, 2, 3, 8, 9, 10, 11, 16)),
        ("5", (5,)),
        ("", ()),
        ("\n", ()),
        ("0-1\n", (0, 1)),
        ("3,1,2-3", (1, 2, 3)),
        ("7-7", (7,)),
    ],
)
def test_cpulist_parses_ranges_singletons_and_empty(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", ["3-1", "a", "1,,2", "1-", "-3", "0-3:2"])
def test_malformed_cpulist_is_a_clear_error(text):
    with pytest.raises(ValueError, match="bad cpulist"):
        parse_cpulist(text)


def test_cpulist_formats_back_to_ranges():
    assert format_cpulist([16, 0, 1, 2, 3, 8, 9, 10, 11]) == "0-3,8-11,16"
    assert parse_cpulist(format_cpulist(range(0, 64, 3))) == tuple(range(0, 64, 3))


# ---- reading the tree ----

def test_epyc_tree_reads_nodes_ccds_cores_and_memory(epyc):
    assert [node.id for node in epyc.nodes] == [0, 1]
    assert epyc.nodes[0].cpus == tuple(range(8)) + tuple(range(16, 24))
    assert epyc.nodes[0].mem_bytes == 64 * GIB
    assert epyc.num_l3_domains == 4
    ccd = epyc.nodes[1].l3_domains[1]
    assert ccd.cpus == (12, 13, 14, 15, 28, 29, 30, 31)
    assert ccd.physical_cores == ((12, 28), (13, 29), (14, 30), (15, 31))
    assert len(epyc.physical_cores) == 16


def test_core_id_identifies_cores_without_sibling_lists(tmp_path):
    topology = read_topology(make_sysfs(tmp_path, sibling_lists=False), allowed_cpus=range(32))
    # core_id repeats across packages; package + core_id must still tell the cores apart
    assert len(topology.physical_cores) == 16
    assert topology.nodes[1].physical_cores[0] == (8, 24)


def test_tree_without_nodes_or_caches_is_one_node_one_domain(tmp_path):
    root = make_sysfs(tmp_path, nodes=1, ccds_per_node=2, node_dirs=False, cache_info=False)
    topology = read_topology(root, allowed_cpus=range(16))
    (node,) = topology.nodes
    assert node.id == 0 and node.cpus == tuple(range(16))
    assert len(node.l3_domains) == 1 and len(node.physical_cores) == 8
    assert node.mem_bytes > 0  # the host's RAM stands in for the missing node meminfo
    (worker,) = plan_workers(topology, "auto")
    assert worker.threads == 8


def test_allowed_cpus_restrict_the_topology_and_drop_empty_domains(tmp_path, monkeypatch):
    # a container allowed CCD 0 of node 0 (both threads) and one thread of each core of CCD 0 of node 1
    allowed = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    topology = read_topology(make_sysfs(tmp_path))
    assert set(topology.cpus) == allowed
    assert [len(node.l3_domains) for node in topology.nodes] == [1, 1]
    assert topology.nodes[1].physical_cores == ((8,), (9,), (10,), (11,))
    workers = plan_workers(topology, "auto")
    assert [(w.node, w.threads) for w in workers] == [(0, 4), (1, 4)]


def test_nodes_without_allowed_cpus_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8, 16)))
    topology = read_topology(make_sysfs(tmp_path))
    assert [node.id for node in topology.nodes] == [1]
    assert plan_workers(topology, "auto")[0].node == 1


def test_no_allowed_online_cpu_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="no usable CPU"):
        read_topology(make_sysfs(tmp_path), allowed_cpus={100})


def test_real_sysfs_parses():
    topology = read_topology()
    assert set(topology.cpus) == os.sched_getaffinity(0)
    assert all(node.l3_domains and node.physical_cores for node in topology.nodes)
    assert "cpu-decode-0" in describe(plan_workers(topology, "auto"), topology)


# ---- the worker plan ----

def test_auto_plans_one_worker_per_node_with_a_thread_per_core(epyc):
    workers = plan_workers(epyc, "auto")
    assert [(w.index, w.node, w.threads) for w in workers] == [(0, 0, 8), (1, 1, 8)]
    assert workers[0].cpus == epyc.nodes[0].cpus and len(workers[1].cpus) == 16
    assert all(siblings_paired(w.cpus) for w in workers)
    assert plan_workers(epyc, "node") == workers


def test_ccd_plans_one_worker_per_l3_domain(epyc):
    workers = plan_workers(epyc, "ccd")
    assert [(w.node, w.threads) for w in workers] == [(0, 4), (0, 4), (1, 4), (1, 4)]
    assert workers[2].cpus == (8, 9, 10, 11, 24, 25, 26, 27)


def test_worker_count_splits_cores_evenly_without_splitting_siblings(epyc):
    workers = plan_workers(epyc, 3)
    assert sorted(w.threads for w in workers) == [5, 5, 6]
    assert all(siblings_paired(w.cpus) for w in workers)
    assert sorted(c for w in workers for c in w.cpus) == list(range(32))


def test_worker_count_keeps_groups_inside_nodes_when_sizes_allow(tmp_path):
    # 2 nodes of 7 cores, 4 workers: sizes 4,3,4,3 fit the nodes where 4,4,3,3 would straddle
    root = make_sysfs(tmp_path, ccds_per_node=1, cores_per_ccd=7, threads_per_core=1)
    topology = read_topology(root, allowed_cpus=range(14))
    workers = plan_workers(topology, 4)
    assert [w.threads for w in workers] == [4, 3, 4, 3]
    assert [w.node for w in workers] == [0, 0, 1, 1]
    assert workers[1].cpus == (4, 5, 6)


def test_one_worker_per_core_is_the_finest_plan(epyc):
    workers = plan_workers(epyc, 16)
    assert all(w.threads == 1 and len(w.cpus) == 2 for w in workers)
    assert plan_workers(epyc, "4") == plan_workers(epyc, "ccd")


@pytest.mark.parametrize("mode", [0, -1, 17, True, "many", 2.0])
def test_bad_worker_count_is_a_clear_error(epyc, mode):
    with pytest.raises(ValueError, match="cpu workers|physical cores"):
        plan_workers(epyc, mode)


def test_more_workers_than_cores_only_when_oversubscribed_and_then_one_thread_each_on_cores_in_turn(epyc):
    with pytest.raises(ValueError, match="physical cores"):
        plan_workers(epyc, 20)
    workers = plan_workers(epyc, 20, oversubscribe=True)
    assert [w.index for w in workers] == list(range(20)) and all(w.threads == 1 for w in workers)
    assert workers[16].cpus == workers[0].cpus and workers[19].cpus == workers[3].cpus
    assert plan_workers(epyc, 8, oversubscribe=True) == plan_workers(epyc, 8)  # no change where cores suffice
    with pytest.raises(ValueError, match="between 1"):
        plan_workers(epyc, 0, oversubscribe=True)


def test_describe_shows_every_worker_and_the_host(epyc):
    text = describe(plan_workers(epyc, "ccd"), epyc)
    assert "2 NUMA node(s), 4 L3 domain(s), 16 physical cores / 32 CPUs" in text
    assert "cpu-decode-3: node 1, 4 threads, cpus 12-15,28-31" in text
    assert len(text.splitlines()) < 25
