"""A step's new KV, and the state rows of the sequences it finishes, from the device staging cache to the host pool.

Per layer, once its KV is final (StreamingPrefill's after_layer hook, or after a plain forward), on a stream of
its own behind the layer's compute: its new rows go straight into the pool's registered pages, one async copy per
run of rows consecutive on both sides (one copy per layer for a prompt on consecutive pages). A page table too
fragmented for that (over MAX_DIRECT_RUNS runs), or a pool whose pages could not all be registered, takes one gather
on the device and one copy into a pinned block per layer, then one index_copy per layer into the pool at the end. No
per-page Python loops either way. (An async copy into pageable memory that shares a page with another registration
fails: the driver takes the whole copy for registered memory.)

With per-layer staging (`layer_staging`: layer i's KV on buffer i % 2) the compute of layer i + 1 waits for the
copies out of its buffer (those of layer i - 1), which ran during layer i."""

import contextlib

import torch

from krasis.common.kv_cache import KVCache
from krasis.gpu_worker.host_memory import HostRegistration

MAX_DIRECT_RUNS = 64  # copies a layer may take straight into the pool; beyond it, the pinned block is cheaper


def layer_staging(kv_widths: list[int], rows: int, page_size: int, dtype, device, state_widths: list[int],
                  state_slots: int) -> KVCache:  # fmt: skip
    """A staging KVCache whose layers take turns on two device buffers of `rows` tokens at the widest layer's width
    (layer i on buffer i % 2), and fp32 state rows [state_slots, width] for each layer with state."""
    width = max(kv_widths, default=0)
    buffers = [torch.empty(rows * width, dtype=dtype, device=device) for _ in range(2)]
    layers = [buffers[i % 2][: rows * w].view(rows, w) for i, w in enumerate(kv_widths)]
    states = [torch.zeros(state_slots if w else 0, w, dtype=torch.float32, device=device) for w in state_widths]
    return KVCache(layers, page_size, states)


def contiguous_runs(src: torch.Tensor, dst: torch.Tensor) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the maximal runs where both slot lists ([T], on the host) go up by one."""
    breaks = ((src[1:] - src[:-1] != 1) | (dst[1:] - dst[:-1] != 1)).nonzero().flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    lengths = torch.diff(starts, append=torch.tensor([src.numel()]))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


class KVHandOff:
    """Copies into `pool` (host shared memory, or any KVCache) from `staging` (on the model's device)."""

    def __init__(self, staging: KVCache, pool: KVCache, reuses_buffers: bool = False):
        self.staging, self.pool, self.reuses_buffers = staging, pool, reuses_buffers
        self.device = staging.layers[0].device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        host = [t for t in [*pool.layers, *pool.states] if t.numel() and t.device.type == "cpu"]
        self.registration = HostRegistration(host, writable=True) if self.cuda and host else None
        self.gathered = self.host = None  # the fragmented path's device block and pinned block, grown on demand
        self.runs, self.state_rows, self.offsets = [], [], []
        self.pool_registered = self.registration is None or not self.registration.failed
        self.gathers = False  # this step goes through the pinned block
        self.pending_states = []  # (layer, pool slot, pinned row): state rows bound for unregistered pool pages
        self._previous_copies = None  # event: the copies of the layer before the one just done

    def close(self) -> None:
        """Unregister the pool (before it is unmapped)."""
        if self.registration is not None:
            self.stream.synchronize()
            self.registration.close()
            self.registration = None

    def begin(self, staging_slots: torch.Tensor, pool_slots: torch.Tensor, state_rows=()) -> None:
        """A step's new tokens: staging_slots and pool_slots [T] in the same token order; `state_rows`: (staging
        slot, pool slot) of each sequence whose state is final after this step."""
        self.staging_slots, self.pool_slots = staging_slots, pool_slots.to(self.pool.layers[0].device)
        self.state_rows = list(state_rows)
        self.runs = contiguous_runs(staging_slots.cpu(), pool_slots.cpu())
        self.gathers = len(self.runs) > MAX_DIRECT_RUNS or not self.pool_registered
        if self.gathers:
            widths = [layer.shape[1] for layer in self.staging.layers]
            self.offsets = [0]
            for width in widths:
                self.offsets.append(self.offsets[-1] + staging_slots.numel() * width)
            self._ensure_blocks(staging_slots.numel() * max(widths), self.offsets[-1])
        self._previous_copies = None

    def layer_done(self, i: int) -> None:
        """Start copying layer i's new KV (and finished state rows) to the pool; call after its last chunk."""
        if self.stream is not None:
            self.stream.wait_event(torch.cuda.current_stream(self.device).record_event())
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            if self.gathers:
                self._copy_gathered(i)
            else:
                self._copy_runs(i)
            for staging_slot, pool_slot in self.state_rows:
                if self.staging.states[i].numel():
                    self._copy_state(i, staging_slot, pool_slot)
        if self.stream is None:
            return
        copies = self.stream.record_event()
        if self.reuses_buffers and self._previous_copies is not None:  # layer i + 1 overwrites layer i - 1's buffer
            torch.cuda.current_stream(self.device).wait_event(self._previous_copies)
        self._previous_copies = copies

    def finish(self) -> None:
        """Wait for the copies (the fragmented path: then scatter every layer into the pool)."""
        if self.stream is not None:
            self.stream.synchronize()
        for layer, pool_slot, row in self.pending_states:
            self.pool.states[layer][pool_slot].copy_(row)
        self.pending_states = []
        if not self.gathers:
            return
        tokens = self.pool_slots.numel()
        for i, pool_layer in enumerate(self.pool.layers):
            block = self.host[self.offsets[i] : self.offsets[i + 1]].view(tokens, pool_layer.shape[1])
            pool_layer.index_copy_(0, self.pool_slots, block)

    def copy_all(self) -> None:
        """The whole hand-off after a plain forward (every layer already written), after `begin`."""
        for i in range(len(self.staging.layers)):
            self.layer_done(i)
        self.finish()

    def _copy_state(self, i: int, staging_slot: int, pool_slot: int) -> None:
        source = self.staging.states[i][staging_slot]
        if self.pool_registered:
            self.pool.states[i][pool_slot].copy_(source, non_blocking=self.cuda)
        else:  # through a pinned row, copied into the pool by `finish` once the stream is done
            row = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self.pending_states.append((i, pool_slot, row.copy_(source, non_blocking=True)))

    def _copy_runs(self, i: int) -> None:
        source, target = self.staging.layers[i], self.pool.layers[i]
        if not source.shape[1]:  # a layer without KV (linear attention)
            return
        for src, dst, length in self.runs:
            target[dst : dst + length].copy_(source[src : src + length], non_blocking=self.cuda)

    def _copy_gathered(self, i: int) -> None:
        tokens, width = self.staging_slots.numel(), self.staging.layers[i].shape[1]
        block = self.gathered[: tokens * width].view(tokens, width)  # [T, w]
        torch.index_select(self.staging.layers[i], 0, self.staging_slots, out=block)
        self.host[self.offsets[i] : self.offsets[i + 1]].copy_(block.view(-1), non_blocking=self.cuda)

    def _ensure_blocks(self, device_numel: int, host_numel: int) -> None:
        dtype = self.staging.layers[0].dtype
        if self.gathered is None or self.gathered.numel() < device_numel:
            self.gathered = torch.empty(device_numel, dtype=dtype, device=self.device)
        if self.host is None or self.host.numel() < host_numel:
            self.host = torch.empty(host_numel, dtype=dtype, pin_memory=self.cuda)
