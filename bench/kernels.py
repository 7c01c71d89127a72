"""CPU quant kernel speed: GB/s of weight bytes read, next to read bandwidth measured in this run.

Per format, expert shape and rows M: krasis quant_linear, torch's `_weight_int8pack_mm` and bf16
F.linear, each cycling over enough copies of the weight (random bytes) that every call reads
from memory, not cache; one large matrix, whose calls are long enough that the ~10 us cost of a
call vanishes; then quant_experts over DeepSeek-V2-Lite-shaped layers (64 experts, top-6).
"""

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from krasis.bench.limits import read_bandwidth
from krasis.common.quant.cpu_kernels import kernel_backend, quant_experts, quant_linear
from krasis.common.quant.formats import QuantizedWeight, QuantSpec, storage_shapes

SHAPES = ((2048, 1408), (1408, 2048), (2048, 768), (4096, 1536))  # (K, N): expert shapes
STREAM_SHAPE = (2048, 1 << 19)  # one 0.6-2 GB matrix: the kernel's streaming rate, call overhead amortized
ROWS = (1, 4, 8, 16)
KERNELS = ("q8", "q4", "torch-int8pack", "torch-bf16")
V2_LITE_EXPERTS = (64, 1408, 2048, 6)  # experts, expert width I, hidden H, top-k
GB = 1e9


def random_stack(make, copies: int) -> torch.Tensor:
    """[copies, ...] from up to 4 random copies made by `make`, repeated: fast to build, never all zeros."""
    base = torch.stack([make() for _ in range(min(copies, 4))])
    return base.repeat(-(-copies // len(base)), *([1] * (base.dim() - 1)))[:copies].contiguous()


def random_quantized(spec: QuantSpec, shape: tuple[int, ...], gen: torch.Generator) -> QuantizedWeight:
    """[copies, N, K] with random bytes in a valid layout: the kernels' speed does not depend on the values."""
    copies, n, k = shape
    group = spec.group_for(k)
    if spec.format == "q8":
        qweight = random_stack(lambda: torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), copies)
    else:
        qweight = random_stack(lambda: torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen), copies)
    scales = random_stack(lambda: (torch.rand((n, k // group), generator=gen) * 1e-2).to(torch.bfloat16), copies)
    return QuantizedWeight(spec, shape, qweight, scales)


def weight_bytes(kernel: str, k: int, n: int) -> int:
    """Bytes one call reads: the weight and its scales."""
    if kernel in ("q8", "q4"):
        q_shape, s_shape = storage_shapes(QuantSpec(kernel), (n, k))
        return q_shape[0] * q_shape[1] + 2 * s_shape[0] * s_shape[1]
    return n * k + 2 * n if kernel == "torch-int8pack" else 2 * n * k


def linear_calls(kernel: str, k: int, n: int, copies: int, gen: torch.Generator) -> list:
    """[fn(x) per weight copy]."""
    if kernel in ("q8", "q4"):
        stack = random_quantized(QuantSpec(kernel), (copies, n, k), gen)
        return [lambda x, w=stack[c]: quant_linear(x, w) for c in range(copies)]
    if kernel == "torch-int8pack":
        stack = random_stack(lambda: torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), copies)
        scales = torch.rand(n, generator=gen).to(torch.bfloat16)
        return [lambda x, w=w: torch._weight_int8pack_mm(x, w, scales) for w in stack]
    stack = random_stack(lambda: torch.randn((n, k), generator=gen).to(torch.bfloat16), copies)
    return [lambda x, w=w: F.linear(x, w) for w in stack]


def time_calls(calls, args_for, min_seconds: float) -> float:
    """Seconds per call, cycling through `calls` (cold weights) for at least min_seconds and 10 calls."""
    for i in range(min(3, len(calls))):
        calls[i](*args_for(i))
    count, start = 0, time.perf_counter()
    while count < 10 or time.perf_counter() - start < min_seconds:
        calls[count % len(calls)](*args_for(count))
        count += 1
    return (time.perf_counter() - start) / count


def bench_linear(args, bandwidth: float, gen: torch.Generator) -> list[dict]:
    results = []
    for k, n in (*SHAPES, STREAM_SHAPE):
        for kernel in KERNELS:
            copies = max(1, int(args.working_set_gb * GB // weight_bytes(kernel, k, n)))
            nbytes, calls = weight_bytes(kernel, k, n), linear_calls(kernel, k, n, copies, gen)
            for m in ROWS:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                seconds = time_calls(calls, lambda i: (x,), args.min_seconds)
                results.append({
                    "kernel": kernel, "k": k, "n": n, "m": m, "us": seconds * 1e6,
                    "gbs": nbytes / seconds / GB, "ratio": nbytes / seconds / GB / bandwidth,
                })
                log(f"  {kernel:<15} K={k:<5} N={n:<5} M={m:<3} {seconds * 1e6:9.1f} us  {nbytes / seconds / GB:6.1f} GB/s")
            del calls
    add_per_row(results, ("kernel", "k", "n"))
    return results


def bench_experts(args, bandwidth: float, gen: torch.Generator) -> list[dict]:
    num_experts, inter, hidden, top_k = V2_LITE_EXPERTS
    results = []
    for fmt in ("q8", "q4"):
        spec = QuantSpec(fmt)
        gate_up = random_quantized(spec, (num_experts, 2 * inter, hidden), gen)
        layers = max(2, int(args.working_set_gb * GB // gate_up.nbytes))
        stacks = [(random_quantized(spec, (num_experts, 2 * inter, hidden), gen),
                   random_quantized(spec, (num_experts, hidden, inter), gen)) for _ in range(layers)]
        per_expert = (stacks[0][0].nbytes + stacks[0][1].nbytes) / num_experts
        for tokens in ROWS:
            routes = [torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
                      for _ in range(64)]
            x, weights = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16), torch.rand(tokens, top_k)
            calls = [lambda ids, gu=gu, dn=dn: quant_experts(x, gu, dn, ids, weights) for gu, dn in stacks]
            seconds = time_calls(calls, lambda i: (routes[i % len(routes)],), args.min_seconds)
            hit = sum(len(torch.unique(r)) for r in routes) / len(routes)
            nbytes = hit * per_expert
            results.append({
                "kernel": f"{fmt} experts", "k": hidden, "n": f"E{num_experts}/top{top_k}", "m": tokens,
                "us": seconds * 1e6, "gbs": nbytes / seconds / GB, "ratio": nbytes / seconds / GB / bandwidth,
                "experts_hit": hit,
            })
            log(f"  {fmt} experts T={tokens:<3} {seconds * 1e6:9.1f} us  {nbytes / seconds / GB:6.1f} GB/s")
        del stacks
    add_per_row(results, ("kernel",))
    return results


def add_per_row(results: list[dict], key: tuple[str, ...]) -> None:
    """per_row_speedup: (time per call at M=1) / (time per row at M); >= 1 means no slower per row."""
    batch1 = {tuple(r[f] for f in key): r["us"] for r in results if r["m"] == 1}
    for r in results:
        r["per_row_speedup"] = batch1[tuple(r[f] for f in key)] / (r["us"] / r["m"])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "commit": commit}


def print_table(report: dict) -> None:
    print(f"\n{report['machine']['cpu']}, {report['threads']} threads, backend {report['backend']}, "
          f"read bandwidth best {report['bandwidth_gbs_best']:.1f} / median {report['bandwidth_gbs_median']:.1f} GB/s")
    print(f"{'kernel':<15}{'K':>6}{'N':>11}{'M':>4}{'us/call':>10}{'GB/s':>8}{'of bw':>7}{'per-row x':>10}")
    for r in report["results"]:
        print(f"{r['kernel']:<15}{r['k']:>6}{r['n']:>11}{r['m']:>4}{r['us']:>10.1f}{r['gbs']:>8.1f}"
              f"{r['ratio']:>7.0%}{r['per_row_speedup']:>10.2f}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress never pollutes --json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bandwidth-gib", type=float, default=2.0)
    parser.add_argument("--working-set-gb", type=float, default=2.0,
                        help="GB of weight copies cycled through: several times the last-level cache")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="timed per kernel, shape and M")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    log(f"kernel backend: {kernel_backend()}; measuring read bandwidth ({args.threads} threads)...")
    best, median = read_bandwidth(args.bandwidth_gib)
    gen = torch.Generator().manual_seed(0)
    results = bench_linear(args, best, gen) + bench_experts(args, best, gen)
    report = {
        "machine": machine(), "threads": args.threads, "backend": kernel_backend(),
        "bandwidth_gbs_best": best, "bandwidth_gbs_median": median, "results": results,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
