"""The shared-memory KV pool: cross-process bit-exact pages, KVCache on top, and no segment left behind."""

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

from krasis.common.shm import SharedKVPool, shared_kv_cache
from krasis.common.shm_segments import SHM_DIR, SharedMemoryFull, cleanup_stale

REPO = Path(__file__).resolve().parents[2]
PAGE_SIZE = 4


def page_bytes(layer: torch.Tensor, page: int) -> bytes:
    return layer[page * PAGE_SIZE : (page + 1) * PAGE_SIZE].contiguous().view(torch.uint8).numpy().tobytes()


def segments(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}-*"))


@pytest.fixture
def prefix():
    name = f"krasis-test-{secrets.token_hex(4)}"
    yield name
    for path in SHM_DIR.glob(f"{name}-*"):
        path.unlink()


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, **kwargs)


def attach_write_and_report() -> None:
    """The second process: attach each pool on stdin, read the owner's page 0, write random bits to page 2."""
    report = []
    for descriptor in msgpack.unpackb(sys.stdin.buffer.read()):
        pool = SharedKVPool.attach(descriptor)
        seen = page_bytes(pool.layers[0], 0)
        layer = pool.layers[1]
        bits = torch.randint(0, 256, (PAGE_SIZE * layer.shape[1] * layer.element_size(),), dtype=torch.uint8)
        layer[2 * PAGE_SIZE : 3 * PAGE_SIZE] = bits.view(layer.dtype).view(PAGE_SIZE, -1)  # NaN payloads included
        report.append({"seen": seen, "wrote": bits.numpy().tobytes()})
        pool.close()
    sys.stdout.buffer.write(msgpack.packb(report))


def test_second_process_writes_pages_the_owner_sees_bit_exactly(prefix):
    pools = [SharedKVPool.create(prefix, [8, 6], 3, PAGE_SIZE, dtype) for dtype in (torch.float32, torch.bfloat16)]
    for pool in pools:
        pool.layers[0][0:PAGE_SIZE] = torch.randn(PAGE_SIZE, 8)
    child = run_python(
        "from tests.unit.test_shm_kv import attach_write_and_report; attach_write_and_report()",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = child.communicate(msgpack.packb([p.descriptor.as_dict() for p in pools]), timeout=120)
    assert child.returncode == 0, err.decode()
    assert b"resource_tracker" not in err and b"Warning" not in err
    for pool, report in zip(pools, msgpack.unpackb(out)):
        assert page_bytes(pool.layers[0], 0) == report["seen"]
        assert page_bytes(pool.layers[1], 2) == report["wrote"]
        assert not pool.layers[1][: 2 * PAGE_SIZE].any()  # nothing outside the page it wrote
    assert len(segments(prefix)) == 2  # the attacher's exit removed nothing
    for pool in pools:
        pool.close()
    assert segments(prefix) == []


def test_kv_cache_on_shared_pool_writes_and_reads_through_page_table(prefix):
    pool = SharedKVPool.create(prefix, [6, 4], num_pages=3, page_size=PAGE_SIZE, dtype=torch.bfloat16)
    kv = shared_kv_cache(pool)
    assert kv.num_pages == 3 and kv.page_size == PAGE_SIZE and kv.pages_for(9) == 3
    slots = kv.slots([2, 0], 0, 6)  # tokens 0-3 on page 2, tokens 4-5 on page 0
    values = torch.randn(6, 6)
    kv.write(0, slots, values)
    assert torch.equal(kv.read(0, slots), values.bfloat16())
    attached = SharedKVPool.attach(msgpack.unpackb(msgpack.packb(pool.descriptor.as_dict())))
    assert torch.equal(attached.layers[0][2 * PAGE_SIZE : 3 * PAGE_SIZE], values[:4].bfloat16())
    assert torch.equal(attached.layers[0][0:2], values[4:].bfloat16())
    attached.close()
    pool.close()


def test_state_regions_are_fp32_per_slot_and_shared_with_attached_processes(prefix):
    # layer 0: attention (KV, no state); layer 1: linear attention (state, no KV)
    pool = SharedKVPool.create(prefix, [6, 0], 3, PAGE_SIZE, "bfloat16", state_widths=[0, 10], num_state_slots=5)
    assert [tuple(t.shape) for t in pool.layers] == [(3 * PAGE_SIZE, 6), (3 * PAGE_SIZE, 0)]
    assert [tuple(t.shape) for t in pool.states] == [(5, 0), (5, 10)]
    assert pool.states[1].dtype == torch.float32  # recurrent state keeps fp32 whatever the KV dtype
    attached = SharedKVPool.attach(msgpack.unpackb(msgpack.packb(pool.descriptor.as_dict())))
    state = torch.randn(10)
    attached.states[1][3] = state
    attached.layers[0][:PAGE_SIZE] = 1.0
    assert torch.equal(pool.states[1][3], state) and not pool.states[1][[0, 1, 2, 4]].any()
    assert bool((pool.layers[0][:PAGE_SIZE] == 1).all()) and not pool.layers[0][PAGE_SIZE:].any()
    with pytest.raises(ValueError, match="one state width"):
        SharedKVPool.attach({**pool.descriptor.as_dict(), "state_widths": [10]})
    attached.close()
    pool.close()


def test_close_unlinks_owner_segment_but_not_attached_ones(prefix):
    pool = SharedKVPool.create(prefix, [16] * 3, num_pages=2, page_size=PAGE_SIZE, dtype="float32")
    attached = SharedKVPool.attach(pool.descriptor)
    attached.close()
    assert segments(prefix) == [pool.descriptor.name]
    with pytest.raises(RuntimeError, match="only the owner"):
        attached.unlink()
    pool.close()
    assert segments(prefix) == []
    with pytest.raises(FileNotFoundError, match="is gone"):
        SharedKVPool.attach(pool.descriptor)


def test_tensors_outlive_close_without_dangling(prefix):
    pool = SharedKVPool.create(prefix, [8], num_pages=1, page_size=PAGE_SIZE, dtype="float32")
    layer = pool.layers[0]
    pool.close()
    layer[0, 0] = 3.0  # still mapped: the tensor keeps the mapping alive, only the name is gone
    assert layer[0, 0] == 3.0 and segments(prefix) == []


@pytest.mark.parametrize("ending", ["sigterm", "exit"])
def test_owner_process_removes_its_segment_on_sigterm_and_exit(prefix, ending):
    owner = run_python(
        "import sys, time\n"
        "from krasis.common.shm import SharedKVPool\n"
        "pool = SharedKVPool.create(sys.argv[1], [64, 64], 4, 16, 'bfloat16')\n"
        "print(pool.descriptor.name, 'torch' in sys.modules, flush=True)\n"
        "time.sleep(60 if sys.argv[2] == 'sigterm' else 0)\n",
        prefix, ending, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with owner.stdout:
        name, torch_imported = owner.stdout.readline().split()
    assert torch_imported == "False"  # an owner that only allocates pages need not pay for importing torch
    if ending == "sigterm":
        assert segments(prefix) == [name]
        owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=30) == (-signal.SIGTERM if ending == "sigterm" else 0)
    assert segments(prefix) == []


def test_cleanup_stale_removes_dead_owners_segments_only(prefix):
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid is gone
    dead_pid = finished.pid
    stale = SHM_DIR / f"{prefix}-{dead_pid}-0badf00d"
    stale.write_bytes(b"\0" * 64)
    unrelated = SHM_DIR / f"{prefix}-notapid"
    unrelated.write_bytes(b"")
    live = SharedKVPool.create(prefix, [8], num_pages=1, page_size=PAGE_SIZE, dtype="float32")
    assert cleanup_stale(prefix) == [stale.name]
    assert segments(prefix) == sorted([live.descriptor.name, unrelated.name])
    live.close()


def test_bad_descriptors_and_oversized_pools_are_clear_errors(prefix):
    pool = SharedKVPool.create(prefix, [8], num_pages=2, page_size=PAGE_SIZE, dtype="bfloat16")
    fields = pool.descriptor.as_dict()
    with pytest.raises(ValueError, match="bad KV pool name"):
        SharedKVPool.attach({**fields, "name": "../../etc/passwd"})
    with pytest.raises(ValueError, match="do not match"):
        SharedKVPool.attach({**fields, "size": fields["size"] * 2})
    with pytest.raises(ValueError, match="its descriptor says"):
        SharedKVPool.attach({**fields, "num_pages": 1024, "size": 65536})
    with pytest.raises(ValueError, match="malformed"):
        SharedKVPool.attach({k: v for k, v in fields.items() if k != "dtype"})
    with pytest.raises(ValueError, match="dtype"):
        SharedKVPool.create(prefix, [8], 1, PAGE_SIZE, "complex64")
    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    with pytest.raises(SharedMemoryFull, match="GiB free"):
        SharedKVPool.create(prefix, [1024], num_pages=free // 1024 + 1, page_size=1, dtype="uint8")
    pool.close()
    assert segments(prefix) == []
