"""A paged KV pool in POSIX shared memory: the GPU prefill worker writes prompt KV, CPU decode workers read it in place.

One segment, /dev/shm/<prefix>-<owner pid>-<token>, holds every layer's [num_pages * page_size, width] region at a
page-aligned offset, then every layer's per-sequence state region (fp32 [num_state_slots, state_width]: the conv and
recurrent state of linear-attention layers; width 0 for layers without one). The owner creates and unlinks
it; other processes attach from a KVPoolDescriptor. Page and state-slot allocation is not here: one scheduler
owns the allocators and tells workers which pages and slot a sequence uses.
"""

import dataclasses
import mmap
import os
import secrets
from dataclasses import dataclass

from krasis.common.shm_segments import SEGMENT_NAME, SHM_DIR, check_space, create_segment, track_owned, unlink_segment

_ALIGN = 4096  # page-aligned layer regions: each can be advised or host-registered (CUDA) on its own
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}
@dataclass(frozen=True)
class KVPoolDescriptor:
    """Everything another process needs to attach a pool; `as_dict()` is msgpack-able."""

    name: str  # file name under /dev/shm
    dtype: str  # torch dtype name: "bfloat16", "float32", ...
    page_size: int
    num_pages: int
    layer_widths: tuple[int, ...]
    layer_offsets: tuple[int, ...]  # byte offset of each layer's region in the segment
    size: int  # bytes of the whole segment
    state_widths: tuple[int, ...] = ()  # fp32 values per sequence slot, per layer ((): no layer has state)
    num_state_slots: int = 0
    state_offsets: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.num_pages * self.page_size

    def as_dict(self) -> dict:
        return {
            "name": self.name, "dtype": self.dtype, "page_size": self.page_size, "num_pages": self.num_pages,
            "layer_widths": list(self.layer_widths), "layer_offsets": list(self.layer_offsets), "size": self.size,
            "state_widths": list(self.state_widths), "num_state_slots": self.num_state_slots,
            "state_offsets": list(self.state_offsets),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, fields: dict) -> "KVPoolDescriptor":
        """Rebuild and validate a descriptor that came over the wire; anything wrong is a ValueError."""
        try:
            descriptor = cls(
                str(fields["name"]), str(fields["dtype"]), int(fields["page_size"]), int(fields["num_pages"]),
                tuple(int(w) for w in fields["layer_widths"]), tuple(int(o) for o in fields["layer_offsets"]),
                int(fields["size"]), tuple(int(w) for w in fields["state_widths"]), int(fields["num_state_slots"]),
                tuple(int(o) for o in fields["state_offsets"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed KV pool descriptor: {exc!r}") from None
        _check(descriptor)
        return descriptor


def _layout(widths: tuple[int, ...], rows: int, itemsize: int, start: int = 0) -> tuple[tuple[int, ...], int]:
    """(byte offset of each region, end), each region starting on an _ALIGN boundary."""
    offsets, end = [], start
    for width in widths:
        offsets.append(end)
        end += -(-rows * width * itemsize // _ALIGN) * _ALIGN
    return tuple(offsets), end


def _full_layout(d: "KVPoolDescriptor") -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(KV region offsets, state region offsets, segment size) of a descriptor's widths, pages and slots."""
    layer_offsets, end = _layout(d.layer_widths, d.rows, _DTYPE_BYTES[d.dtype])
    state_offsets, end = _layout(d.state_widths, d.num_state_slots, 4, end)
    return layer_offsets, state_offsets, end


def _check(d: KVPoolDescriptor) -> None:
    if not SEGMENT_NAME.fullmatch(d.name):
        raise ValueError(f"bad KV pool name {d.name!r}")
    if d.dtype not in _DTYPE_BYTES:
        raise ValueError(f"KV pool dtype {d.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    if d.page_size < 1 or d.num_pages < 1 or not d.layer_widths or min(d.layer_widths) < 0 or max(d.layer_widths) < 1:
        raise ValueError(f"KV pool needs page_size, num_pages >= 1 and layer widths >= 0, one >= 1, got {d}")
    if d.state_widths and (len(d.state_widths) != len(d.layer_widths) or min(d.state_widths) < 0):
        raise ValueError(f"KV pool needs one state width >= 0 per layer, got {d.state_widths}")
    if d.num_state_slots < 0 or (any(d.state_widths) and d.num_state_slots < 1):
        raise ValueError(f"KV pool with state layers needs num_state_slots >= 1, got {d.num_state_slots}")
    if (d.layer_offsets, d.state_offsets, d.size) != _full_layout(d):
        raise ValueError(f"KV pool {d.name}: offsets/size do not match its widths, pages, slots and dtype")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")  # a torch.dtype or its name, without importing torch


class SharedKVPool:
    """One process's mapping of a KV pool segment: `layers` ([num_pages * page_size, width]) and `states`
    (fp32 [num_state_slots, state_width]) are tensors viewing it."""

    def __init__(self, descriptor: KVPoolDescriptor, mapping: mmap.mmap, owner_pid: int | None):
        self.descriptor, self._mapping, self._owner_pid = descriptor, mapping, owner_pid
        self._layers: list | None = None
        self._states: list | None = None

    num_pages = property(lambda self: self.descriptor.num_pages)
    page_size = property(lambda self: self.descriptor.page_size)
    is_owner = property(lambda self: self._owner_pid == os.getpid())  # not a forked child of the owner

    @classmethod
    def create(
        cls, name_prefix: str, layer_widths, num_pages: int, page_size: int, dtype, reserve: bool = True,
        state_widths=(), num_state_slots: int = 0,
    ):  # fmt: skip
        """Create and map a new segment owned by this process: unlinked on close(), on SIGTERM and at exit.

        `reserve` claims the memory now (posix_fallocate), so a full /dev/shm fails here, not as SIGBUS on a write.
        """
        if not SEGMENT_NAME.fullmatch(name_prefix):
            raise ValueError(f"bad KV pool name prefix {name_prefix!r}")
        dtype, widths = _dtype_name(dtype), tuple(int(w) for w in layer_widths)
        states = tuple(int(w) for w in state_widths) if any(state_widths) else ()
        slots = num_state_slots if states else 0
        name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        draft = KVPoolDescriptor(name, dtype, page_size, num_pages, widths, (), 0, states, slots)
        if dtype not in _DTYPE_BYTES:
            _check(draft)  # names the bad dtype
        offsets, state_offsets, size = _full_layout(draft)
        descriptor = dataclasses.replace(draft, layer_offsets=offsets, size=size, state_offsets=state_offsets)
        _check(descriptor)
        check_space(size)
        track_owned(SHM_DIR / name)
        try:
            mapping = create_segment(SHM_DIR / name, size, reserve)
        except BaseException:
            unlink_segment(SHM_DIR / name)
            raise
        return cls(descriptor, mapping, os.getpid())

    @classmethod
    def attach(cls, descriptor: "KVPoolDescriptor | dict") -> "SharedKVPool":
        """Map an existing pool, from its descriptor or the descriptor's dict (as it arrives over msgpack)."""
        if isinstance(descriptor, dict):
            descriptor = KVPoolDescriptor.from_dict(descriptor)
        _check(descriptor)
        try:
            fd = os.open(SHM_DIR / descriptor.name, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(f"KV pool {descriptor.name} is gone: its owner exited or unlinked it") from None
        try:
            actual = os.fstat(fd).st_size
            if actual != descriptor.size:
                raise ValueError(f"KV pool {descriptor.name} is {actual} bytes; its descriptor says {descriptor.size}")
            return cls(descriptor, mmap.mmap(fd, descriptor.size), owner_pid=None)
        finally:
            os.close(fd)

    @property
    def layers(self) -> list:
        """[num_pages * page_size, width] tensors viewing the segment, one per layer (built on first use)."""
        if self._mapping is None:
            raise ValueError(f"KV pool {self.descriptor.name} is closed")
        if self._layers is None:
            d = self.descriptor
            self._layers = _tensor_views(self._mapping, d.dtype, d.rows, d.layer_widths, d.layer_offsets)
        return self._layers

    @property
    def states(self) -> list:
        """fp32 [num_state_slots, state_width] tensors viewing the segment, one per layer (empty: no layer has state)."""
        if self._mapping is None:
            raise ValueError(f"KV pool {self.descriptor.name} is closed")
        if self._states is None:
            d = self.descriptor
            self._states = _tensor_views(self._mapping, "float32", d.num_state_slots, d.state_widths, d.state_offsets)
        return self._states

    def close(self) -> None:
        """Detach (the owner also unlinks). Tensors still in use keep the mapping alive until they are freed."""
        self._layers = self._states = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                pass  # live tensors still view it; the memory unmaps with the last of them
            self._mapping = None
        if self.is_owner:
            self.unlink()

    def unlink(self) -> None:
        """Remove the segment's name (owner only); processes that have it mapped keep using it."""
        if not self.is_owner:
            raise RuntimeError(f"only the owner of KV pool {self.descriptor.name} may unlink it")
        unlink_segment(SHM_DIR / self.descriptor.name)

    def __enter__(self) -> "SharedKVPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor_views(mapping: mmap.mmap, dtype_name: str, rows: int, widths, offsets) -> list:
    # torch here, not at the top: the owner (the scheduler) needs the segment, not tensors, and torch is slow to import.
    import torch

    dtype, buffer, views = getattr(torch, dtype_name), memoryview(mapping), []
    for width, offset in zip(widths, offsets):
        nbytes = rows * width * _DTYPE_BYTES[dtype_name]
        if nbytes == 0:
            views.append(torch.empty(rows, width, dtype=dtype))
            continue
        # A memoryview slice, not the mmap: torch holds it, and its export stops mmap.close() under a live tensor.
        raw = torch.frombuffer(buffer[offset : offset + nbytes], dtype=torch.uint8)
        views.append(raw.view(dtype).view(rows, width))
    return views


def shared_kv_cache(pool: SharedKVPool):
    """A KVCache whose layers are the pool's shared tensors (pages are allocated by the scheduler)."""
    from krasis.common.kv_cache import KVCache  # lazily, like torch, which it imports

    return KVCache(pool.layers, pool.page_size, pool.states or None)
