"""The machine's limits, measured in the run they judge: CPU read bandwidth, pinned host-to-GPU copies, GEMM rate."""

import statistics
import time

import torch
import torch.nn.functional as F

GB = 1e9


def read_bandwidth(gib: float = 2.0, passes: int = 8) -> tuple[float, float]:
    """(best, median) GB/s of torch.sum over a buffer far larger than the L3, first pass dropped as warm-up."""
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)  # ones, not empty: every page is faulted in
    rates = []
    for _ in range(passes + 1):
        start = time.perf_counter()
        buf.sum()
        rates.append(buf.numel() * 4 / (time.perf_counter() - start) / GB)
    del buf
    return max(rates[1:]), statistics.median(rates[1:])


def pinned_to_gpu_bandwidth(gib: float = 1.0, passes: int = 5) -> float:
    """Best GB/s of one large copy from pinned host memory to the current GPU."""
    host = torch.ones(int(gib * 2**30), dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda")
    rates = []
    for _ in range(passes + 1):
        seconds = _cuda_seconds(lambda: device.copy_(host, non_blocking=True))
        rates.append(host.numel() / seconds / GB)
    return max(rates[1:])


def gemm_rate(m: int, k: int, n: int, device: str, dtype: torch.dtype, min_seconds: float = 0.2) -> float:
    """FLOP/s of x [m, k] @ w [n, k]^T on `device`, best over repeats for at least min_seconds."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    w = torch.randn(n, k, generator=gen, device=device).to(dtype)
    timer = _cuda_seconds if device == "cuda" else _cpu_seconds
    best, spent = float("inf"), 0.0
    timer(lambda: F.linear(x, w))  # warm-up: kernel selection, thread pool start
    while spent < min_seconds or best == float("inf"):
        seconds = timer(lambda: F.linear(x, w))
        best, spent = min(best, seconds), spent + seconds
    return 2 * m * k * n / best


def _cuda_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _cpu_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
