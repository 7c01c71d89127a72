"""The pipeline's thread budget: the decode pool leaves a core to the gateway and the prefill worker."""

from krasis.common.topology import WorkerPlacement
from krasis.gateway.worker_groups import HOST_CORES, decode_placements, prefill_threads


def placement(index: int, cores: int) -> WorkerPlacement:
    return WorkerPlacement(index, 0, tuple(range(index * cores, (index + 1) * cores)), cores)


def test_the_leader_gives_up_the_host_cores_and_followers_keep_theirs():
    leader, follower = decode_placements((placement(0, 8), placement(1, 8)))
    assert leader.threads == 8 - HOST_CORES and leader.cpus == placement(0, 8).cpus
    assert follower == placement(1, 8)


def test_a_one_core_leader_keeps_its_thread():
    assert decode_placements((placement(0, 1),))[0].threads == 1


def test_prefill_on_a_gpu_runs_one_thread_and_on_the_cpu_the_host_cores():
    assert prefill_threads("cuda") == 1 and prefill_threads("cpu") == HOST_CORES
