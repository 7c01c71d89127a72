"""CPU decode kernel speed: GB/s of weight bytes read, next to read bandwidth measured in this run.

Sections (--sections): `experts`, quant_experts over DeepSeek-V2-Lite-shaped MoE layers (64 experts, top-6,
all of a layer's selected experts in one call); `dense`, V2-Lite's bf16 linears (attention, shared experts,
the dense MLP, lm_head) through DecodeLinear (the bf16 kernel) and torch's F.linear; `linear`, one q8/q4
matrix through quant_linear, torch's `_weight_int8pack_mm` and bf16 F.linear at expert shapes, and one large
matrix whose calls are long enough that the ~10 us cost of a call vanishes. Every call cycles over enough
copies of its weight that it reads from memory, not cache. Each figure is the median of --repeats timings;
read bandwidth (torch.sum) is measured before every section, and ratios are against its best.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from krasis.bench.limits import read_bandwidth
from krasis.common.quant.cpu_kernels import bf16_backend, kernel_backend, quant_experts, quant_linear
from krasis.common.quant.formats import QuantizedWeight, QuantSpec, storage_shapes
from krasis.common.quant.modules import DecodeLinear

SHAPES = ((2048, 1408), (1408, 2048), (2048, 768), (4096, 1536))  # (K, N): expert shapes
STREAM_SHAPE = (2048, 1 << 19)  # one 0.6-2 GB matrix: the kernel's streaming rate, call overhead amortized
DENSE_SHAPES = {  # (K, N) of DeepSeek-V2-Lite's bf16 linears, read every decode token
    "q_proj": (2048, 3072), "kv_a_proj": (2048, 576), "o_proj": (2048, 2048), "shared gate": (2048, 2816),
    "shared down": (2816, 2048), "dense mlp down": (10944, 2048), "lm_head": (2048, 102400),
}  # fmt: skip
ROWS = (1, 4, 8, 16)
KERNELS = ("q8", "q4", "torch-int8pack", "torch-bf16")
DENSE_KERNELS = ("bf16", "torch-bf16")
V2_LITE_EXPERTS = (64, 1408, 2048, 6)  # experts, expert width I, hidden H, top-k
SECTIONS = ("experts", "dense", "linear")
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


def bf16_stack(k: int, n: int, copies: int, gen: torch.Generator) -> torch.Tensor:
    return random_stack(lambda: (torch.randn((n, k), generator=gen) / k**0.5).to(torch.bfloat16), copies)


def decode_linear(weight: torch.Tensor) -> DecodeLinear:
    """A DecodeLinear over `weight` [N, K], as a loaded model holds one (no bias)."""
    layer = DecodeLinear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def linear_calls(kernel: str, k: int, n: int, copies: int, gen: torch.Generator) -> list:
    """[fn(x) per weight copy]."""
    if kernel in ("q8", "q4"):
        stack = random_quantized(QuantSpec(kernel), (copies, n, k), gen)
        return [lambda x, w=stack[c]: quant_linear(x, w) for c in range(copies)]
    if kernel == "torch-int8pack":
        stack = random_stack(lambda: torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), copies)
        scales = torch.rand(n, generator=gen).to(torch.bfloat16)
        return [lambda x, w=w: torch._weight_int8pack_mm(x, w, scales) for w in stack]
    if kernel == "bf16":
        return [lambda x, layer=decode_linear(w): layer(x) for w in bf16_stack(k, n, copies, gen)]
    return [lambda x, w=w: F.linear(x, w) for w in bf16_stack(k, n, copies, gen)]


def time_calls(calls, args_for, min_seconds: float) -> tuple[float, float]:
    """(seconds per call, CPU share), cycling through `calls` (cold weights) for at least min_seconds and
    10 calls. CPU share: process CPU time over wall time x threads (below ~0.85 the cores were not ours)."""
    for i in range(min(3, len(calls))):
        calls[i](*args_for(i))
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while count < 10 or time.perf_counter() - start < min_seconds:
        calls[count % len(calls)](*args_for(count))
        count += 1
    wall = time.perf_counter() - start
    return wall / count, (time.process_time() - cpu_start) / (wall * torch.get_num_threads())


def record(results: list[dict], nbytes: float, timings: list[tuple[float, float]], **fields) -> None:
    seconds = statistics.median(s for s, _ in timings)
    share = statistics.median(c for _, c in timings)
    results.append({
        **fields, "us": seconds * 1e6, "gbs": nbytes / seconds / GB, "cpu_share": share,
        "us_all": [round(s * 1e6, 1) for s, _ in timings],
    })  # fmt: skip
    log(f"  {fields['kernel']:<15} K={fields['k']:<6} N={fields['n']:<10} M={fields['m']:<3} {seconds * 1e6:9.1f} us"
        f"  {nbytes / seconds / GB:6.1f} GB/s  cpu {share:.0%}")


def bench_linear_shapes(args, gen, kernels, shapes, section: str) -> list[dict]:
    results = []
    for label, (k, n) in shapes:
        for kernel in kernels:
            copies = max(1, int(args.working_set_gb * GB // weight_bytes(kernel, k, n)))
            nbytes, calls = weight_bytes(kernel, k, n), linear_calls(kernel, k, n, copies, gen)
            for m in ROWS:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                timings = [time_calls(calls, lambda i: (x,), args.min_seconds) for _ in range(args.repeats)]
                record(results, nbytes, timings, section=section, kernel=kernel, shape=label, k=k, n=n, m=m)
            del calls
    add_per_row(results, ("kernel", "k", "n"))
    return results


def bench_experts(args, gen: torch.Generator) -> list[dict]:
    num_experts, inter, hidden, top_k = V2_LITE_EXPERTS
    results = []
    for fmt in ("q4", "q8"):
        spec = QuantSpec(fmt)
        gate_up = random_quantized(spec, (num_experts, 2 * inter, hidden), gen)
        layers = max(2, int(args.working_set_gb * GB // gate_up.nbytes))
        stacks = [(random_quantized(spec, (num_experts, 2 * inter, hidden), gen),
                   random_quantized(spec, (num_experts, hidden, inter), gen)) for _ in range(layers)]  # fmt: skip
        per_expert = (stacks[0][0].nbytes + stacks[0][1].nbytes) / num_experts
        for tokens in ROWS:
            routes = [torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
                      for _ in range(64)]  # fmt: skip
            x, weights = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16), torch.rand(tokens, top_k)
            calls = [lambda ids, gu=gu, dn=dn: quant_experts(x, gu, dn, ids, weights) for gu, dn in stacks]
            args_for = lambda i: (routes[i % len(routes)],)  # noqa: E731
            timings = [time_calls(calls, args_for, args.min_seconds) for _ in range(args.repeats)]
            hit = sum(len(torch.unique(r)) for r in routes) / len(routes)
            record(results, hit * per_expert, timings, section="experts", kernel=f"{fmt} experts",
                   shape="V2-Lite MoE layer", k=hidden, n=f"E{num_experts}/top{top_k}", m=tokens, experts_hit=hit)
        del stacks
    add_per_row(results, ("kernel",))
    return results


def add_per_row(results: list[dict], key: tuple[str, ...]) -> None:
    """per_row_speedup: (time per call at M=1) / (time per row at M); >= 1 means no slower per row."""
    batch1 = {tuple(r[f] for f in key): r["us"] for r in results if r["m"] == 1}
    for r in results:
        r["per_row_speedup"] = batch1[tuple(r[f] for f in key)] / (r["us"] / r["m"])


def run_section(name: str, args, gen: torch.Generator) -> list[dict]:
    if name == "experts":
        return bench_experts(args, gen)
    if name == "dense":
        return bench_linear_shapes(args, gen, DENSE_KERNELS, DENSE_SHAPES.items(), "dense")
    shapes = [(f"{k}x{n}", (k, n)) for k, n in (*SHAPES, STREAM_SHAPE)]
    return bench_linear_shapes(args, gen, KERNELS, shapes, "linear")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    return {"cpu": cpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "commit": commit}


def print_table(report: dict) -> None:
    bw = report["bandwidth_gbs_all"]
    print(f"\n{report['machine']['cpu']}, {report['threads']} threads, backends {report['backend']} / bf16 "
          f"{report['bf16_backend']}, read bandwidth best {report['bandwidth_gbs_best']:.1f} / median "
          f"{report['bandwidth_gbs_median']:.1f} GB/s (per section: {', '.join(f'{b:.0f}' for b in bw)}); "
          f"medians of {report['repeats']} timings")
    print(f"{'kernel':<15}{'shape':>16}{'K':>7}{'N':>11}{'M':>4}{'us/call':>10}{'GB/s':>8}{'of bw':>7}"
          f"{'per-row x':>10}{'cpu':>6}")
    for r in report["results"]:
        print(f"{r['kernel']:<15}{r['shape']:>16}{r['k']:>7}{r['n']:>11}{r['m']:>4}{r['us']:>10.1f}{r['gbs']:>8.1f}"
              f"{r['ratio']:>7.0%}{r['per_row_speedup']:>10.2f}{r['cpu_share']:>6.0%}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress never pollutes --json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timings per kernel, shape and M; the median is kept")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0)
    parser.add_argument("--working-set-gb", type=float, default=2.0,
                        help="GB of weight copies cycled through: several times the last-level cache")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="per timing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    log(f"kernel backends: {kernel_backend()} / bf16 {bf16_backend()}; {args.threads} threads")
    gen = torch.Generator().manual_seed(0)
    bandwidth, results = [], []
    for section in args.sections.split(","):
        bandwidth.append(read_bandwidth(args.bandwidth_gib)[0])
        log(f"{section}: read bandwidth {bandwidth[-1]:.1f} GB/s")
        results += run_section(section, args, gen)
    best = max(bandwidth)
    for r in results:
        r["ratio"] = r["gbs"] / best
    report = {
        "machine": machine(), "threads": args.threads, "backend": kernel_backend(), "bf16_backend": bf16_backend(),
        "repeats": args.repeats, "bandwidth_gbs_best": best, "bandwidth_gbs_median": statistics.median(bandwidth),
        "bandwidth_gbs_all": bandwidth, "results": results,
    }  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
