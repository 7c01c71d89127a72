"""Page-locking host tensors in place (cudaHostRegister), so host -> GPU copies from them are DMA with no
staging copy: the memory-mapped quantized cache (read-only pages), a float model's expert parameters, the
shared KV pool (written by the device).

Registrations are counted per page range for the whole process: two runners over the same model (a test's
resident and streamed runners, a restart) share one registration instead of the second failing with
"already mapped". A failed runtime call leaves its error for torch's next launch check to raise from an
unrelated kernel, so every failure here is read back at once.
"""

import logging

import torch

log = logging.getLogger("krasis.gpu_worker")

PAGE = 4096
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08  # for PROT_READ mappings (the cache), which cannot be registered writable

_counts: dict[tuple[int, int], int] = {}  # registered [start, end) -> HostRegistrations holding it


def _page_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Page-rounded [start, end) address ranges covering the tensors, overlapping or touching ones merged."""
    spans = sorted((t.data_ptr() // PAGE * PAGE, -(-(t.data_ptr() + t.nbytes) // PAGE) * PAGE) for t in tensors if t.nbytes)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class HostRegistration:
    """Registers tensors' pages with CUDA for the life of this object; `sources` are what to copy from
    (the tensors themselves, or pinned copies of those whose pages could not be registered).

    `writable`: the device writes into them (the shared KV pool); pages that fail to register stay as they are
    (copies into them are then staged by the driver: correct, slower)."""

    def __init__(self, tensors: list[torch.Tensor], writable: bool = False):
        self.held: list[tuple[int, int]] = []
        self.failed: list[tuple[int, int]] = []  # ranges left unregistered (shared pages, another registration)
        failed = self.failed
        mappings = _mappings()  # read once for all the spans
        storages = sorted((t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                          for t in tensors)  # fmt: skip
        for span in _page_ranges(tensors):
            if _exclusive(span, mappings, storages) and _hold(span, mappings):
                self.held.append(span)
            else:
                failed.append(span)
        self.sources = tensors if writable else [self._pinned_if_in(t, failed) for t in tensors]
        if failed:
            log.warning("cudaHostRegister failed for %d of %d host ranges; %s", len(failed),
                        len(failed) + len(self.held),
                        "copies into them go through the driver" if writable else "copied them into pinned memory")  # fmt: skip

    @staticmethod
    def _pinned_if_in(tensor: torch.Tensor, failed: list[tuple[int, int]]) -> torch.Tensor:
        if any(a <= tensor.data_ptr() < b for a, b in failed):
            return tensor.pin_memory()
        return tensor

    def close(self) -> None:
        for span in self.held:
            _release(span)
        self.held = []

    def __del__(self):
        # A registration must not outlive its owner: the memory may be unmapped and another mapping take the same
        # addresses, and a stale registration there would point DMA at the old pages.
        if self.held:
            torch.cuda.synchronize()  # no copy may still be using the pages
            self.close()


def _exclusive(span: tuple[int, int], mappings: list[tuple[int, int, str, str]], storages: list[tuple[int, int]]) -> bool:
    """Whether registering the page-rounded span pins no other object's bytes. Inside the malloc heap, the pages at
    a tensor's ends hold other allocations, and a later copy of one of those that crosses the registered range's
    edge fails ("invalid argument", raised from an unrelated op: seen with a test's small pool). Memory mapped for
    the tensors themselves (the cache's files, shared memory, large allocations) is theirs to the page edge.
    `storages`: the tensors' storages' [start, end), sorted."""
    start, end = span
    if not any(low < end and start < high and path == "[heap]" for low, high, _, path in mappings):
        return True
    reach = start
    for low, high in storages:
        if low > reach:
            break
        reach = max(reach, high)
    return reach >= end


def _mappings() -> list[tuple[int, int, str, str]]:
    """This process's mappings from /proc/self/maps: (start, end, permissions, path or "")."""
    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    return [(*(int(a, 16) for a in f[0].split("-")), f[1], f[5].strip() if len(f) > 5 else "") for f in fields]


def _hold(span: tuple[int, int], mappings: list[tuple[int, int, str, str]]) -> bool:
    """Register [start, end) unless this process already did (then count one more holder)."""
    if span in _counts:
        _counts[span] += 1
        return True
    if any(a < span[1] and span[0] < b for a, b in _counts):
        return False  # partly registered under another range: CUDA refuses overlaps
    start, end = span
    writable = all("w" in perms for low, high, perms, _ in mappings if low < end and start < high)
    flags = HOST_REGISTER_PORTABLE | (0 if writable else HOST_REGISTER_READ_ONLY)
    if not _ok(torch.cuda.cudart().cudaHostRegister(start, end - start, flags)):
        _clear_last_error()
        return False
    _counts[span] = 1
    return True


def _release(span: tuple[int, int]) -> None:
    _counts[span] -= 1
    if _counts[span] == 0:
        del _counts[span]
        torch.cuda.cudart().cudaHostUnregister(span[0])


def _ok(result) -> bool:
    return int(getattr(result, "value", result)) == 0


def _clear_last_error() -> None:
    """Read back the runtime's last error. torch's cudart bindings have no cudaGetLastError, but the check after
    a kernel launch calls it: launch a no-op, and the error it raises is the failed registration's, now consumed."""
    try:
        torch.zeros(1, device="cuda").add_(0)
    except RuntimeError:
        pass
