"""Which device prefills a prompt: the GPU (streaming its non-resident experts once) or the CPU.

GPU time = fixed + max(streamed bytes / link rate, tokens / GPU rate) (copies overlap compute);
CPU time = tokens / CPU rate. Every rate is measured on this machine (see the measure_* functions),
so the crossover follows the hardware instead of a constant."""

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillRates:
    link_bytes_per_s: float  # pinned host -> GPU copies
    gpu_tokens_per_s: float  # GPU prefill with the weights already in VRAM
    cpu_tokens_per_s: float  # CPU prefill of the same model
    gpu_fixed_s: float = 0.0  # per-step launch and sync cost of the GPU path

    def __post_init__(self):
        for name in ("link_bytes_per_s", "gpu_tokens_per_s", "cpu_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"prefill rate {name} must be positive, got {getattr(self, name)!r}")


def gpu_prefill_seconds(tokens: int, streamed_bytes: int, rates: PrefillRates) -> float:
    return rates.gpu_fixed_s + max(streamed_bytes / rates.link_bytes_per_s, tokens / rates.gpu_tokens_per_s)


def cpu_prefill_seconds(tokens: int, rates: PrefillRates) -> float:
    return tokens / rates.cpu_tokens_per_s


def prefers_cpu(tokens: int, streamed_bytes: int, rates: PrefillRates) -> bool:
    """True when the CPU would finish these tokens strictly sooner than the GPU."""
    return cpu_prefill_seconds(tokens, rates) < gpu_prefill_seconds(tokens, streamed_bytes, rates)


def crossover_tokens(streamed_bytes: int, rates: PrefillRates) -> float:
    """The fewest tokens from which the GPU is at least as fast (inf if the CPU always wins, 1 if it never does)."""
    if rates.cpu_tokens_per_s >= rates.gpu_tokens_per_s:
        return math.inf  # the CPU is faster per token and has no transfer to pay
    fixed = rates.gpu_fixed_s + streamed_bytes / rates.link_bytes_per_s  # GPU time while transfer-bound
    tokens = math.ceil(fixed * rates.cpu_tokens_per_s)
    if tokens / rates.gpu_tokens_per_s > streamed_bytes / rates.link_bytes_per_s:
        # compute-bound there already: solve fixed_s + t / g <= t / c
        per_token = 1 / rates.cpu_tokens_per_s - 1 / rates.gpu_tokens_per_s
        tokens = math.ceil(rates.gpu_fixed_s / per_token)
    while prefers_cpu(tokens, streamed_bytes, rates):  # ceil rounding at the boundary
        tokens += 1
    return max(tokens, 1)


def measure_pinned_link_rate(device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best pinned host -> device copy rate in bytes/s (CUDA only)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_tokens_per_s(run, tokens: int, repeats: int = 2, synchronize=None) -> float:
    """tokens / best wall time of run(tokens) (a prefill of that many tokens), after one warm-up."""
    run(tokens)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run(tokens)
        if synchronize is not None:
            synchronize()
        best = min(best, time.perf_counter() - start)
    return tokens / best
