"""Where a CPU decode token's time goes: `CpuDecodeCore` on a bench preset's quantized random cache (the model the
`krasis-ctl bench` decode runs), at given contexts of random cached KV (no prefill), timed, then profiled.

Per token: wall time against the read-bandwidth bound, then the profiled time split into the CPU kernels (by op),
the costliest torch ops, every other torch op (host overhead: ~microseconds of work each) and Python between ops,
also over the layers. `--preset tiny --layers 27` prices the host overhead alone (the same ops at toy widths).
Also prints the OpenMP runtimes loaded: two (torch's and the kernels') would fight for the cores at every switch
between a torch op and a kernel.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from krasis.bench.accounting import decode_bytes_per_token
from krasis.bench.limits import read_bandwidth
from krasis.bench.presets import PRESETS
from krasis.bench.random_weights import bench_model_dir, ensure_random_cache
from krasis.common.kernels.cpu import decode_ops
from krasis.common.layers import attention
from krasis.common.kv_cache import KVCache
from krasis.common.model_loader import load_model, resolve_dtype
from krasis.common.protocol_pipeline import HandOff
from krasis.common.quant.plan import QuantPlan
from krasis.common.sampling import SamplingParams
from krasis.cpu_worker.core import CpuDecodeCore

PAGE_SIZE = 16
US = 1e6


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (after the kernels are loaded)."""
    names = ("libgomp", "libiomp", "libomp")
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names)})


def decode_core(model, contexts: list[int], tokens: int, dtype: torch.dtype) -> tuple[CpuDecodeCore, int]:
    """A decode core over a private KV pool of random values, long enough for the longest context."""
    pages = -(-(max(contexts) + tokens + 2) // PAGE_SIZE)
    kv = KVCache.allocate(model.kv_widths, pages, PAGE_SIZE, dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    for layer in kv.layers:  # attention reads the same bytes whatever they hold
        layer.copy_(torch.randn(layer.shape, generator=gen))
    return CpuDecodeCore(model, kv, frozenset(), model.config.vocab_size, pages * PAGE_SIZE), pages


def decode(core: CpuDecodeCore, pages: int, context: int, tokens: int) -> list[float]:
    """One sequence whose first `context` - 1 tokens are cached; seconds of each of `tokens` steps."""
    ids = torch.randint(100, core.vocab_size, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    core.add(HandOff(f"profile-{context}", ids, context - 1, list(range(pages)), params, []))
    seconds = []
    while core.has_work:
        start = time.perf_counter()
        core.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def profile_tokens(core: CpuDecodeCore, pages: int, context: int, tokens: int, top: int = 8) -> dict:
    """Profiled steps, microseconds per token: each op of our extensions, the `top` costliest torch ops, the rest of
    the torch ops together, and Python between ops (the profiled wall time not inside any op); op calls per token."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall_us = sum(decode(core, pages, context, tokens)) * US / tokens
    kernels, torch_ops, calls = {}, [], 0
    for event in prof.key_averages():
        calls += event.count
        name, us = f"{event.key.rsplit('::', 1)[-1]} ({event.count / tokens:.0f}x)", event.self_cpu_time_total / tokens
        if event.key.startswith("krasis_"):  # an op of our extensions
            kernels[f"kernel {name}"] = us
        else:
            torch_ops.append((f"{event.key} ({event.count / tokens:.0f}x)", us))
    torch_ops.sort(key=lambda op: -op[1])
    parts = {**dict(sorted(kernels.items())), **dict(torch_ops[:top])}
    parts["other torch ops"] = sum(us for _, us in torch_ops[top:])
    parts["python between ops"] = wall_us - sum(parts.values())
    return {"profiled_us_per_token": wall_us, "parts_us": parts, "op_calls_per_token": calls / tokens}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.torch_formulas:  # every caller of the decode-step kernels falls back to the torch ops they replace
        decode_ops.ops = lambda: None
    bandwidth = read_bandwidth(args.bandwidth_gib)[0] if args.bandwidth_gib else None
    raw = {**PRESETS[args.preset], **({"num_hidden_layers": args.layers} if args.layers else {})}
    plan, dtype = QuantPlan.parse(args.quant, args.dense), resolve_dtype(args.dtype)
    model_dir = bench_model_dir(args.preset, raw, 0)
    ensure_random_cache(model_dir, plan)
    model = load_model(model_dir, dtype=dtype, device="cpu", quant=plan)
    contexts = [int(c) for c in args.contexts.split(",")]
    core, pages = decode_core(model, contexts, args.tokens, dtype)
    decode(core, pages, min(contexts), 4)  # warm-up: the kernels' build, thread pools, first page faults
    layers = raw["num_hidden_layers"]
    result = {"preset": args.preset, "layers": layers, "threads": args.threads, "quant": plan.tag,
              "decode_kernels": not args.torch_formulas, "openmp_runtimes": openmp_runtimes(), "read_gbs": bandwidth,
              "contexts": {}}  # fmt: skip
    for context in contexts:
        seconds = decode(core, pages, context, args.tokens)
        ms = 1e3 * statistics.median(seconds)
        entry = {"ms_per_token_median": ms, "ms_per_token_mean": 1e3 * statistics.mean(seconds),
                 "ms_per_layer": ms / layers}  # fmt: skip
        if bandwidth:
            total = sum(decode_bytes_per_token(model, context + args.tokens // 2, dtype.itemsize).values())
            entry.update(bytes_per_token=total, bound_ms=total / (bandwidth * 1e9) * 1e3)
        if args.profile_tokens:
            entry.update(profile_tokens(core, pages, context, args.profile_tokens))
        result["contexts"][context] = entry
    return result


def print_report(r: dict) -> None:
    kernels = "decode-step kernels" if r["decode_kernels"] else "torch formulas (no decode-step kernels)"
    print(f"{r['preset']} {r['layers']} layers, {r['quant']}, {r['threads']} threads, {kernels}; read bandwidth "
          f"{r['read_gbs'] or 0:.1f} GB/s; OpenMP runtimes: {', '.join(r['openmp_runtimes']) or 'none'}")  # fmt: skip
    for context, e in r["contexts"].items():
        bound = ""
        if "bound_ms" in e:
            bound = f", bound {e['bound_ms']:.1f} ms ({e['bound_ms'] / e['ms_per_token_median']:.0%})"
        print(f"context {context}: {e['ms_per_token_median']:.2f} ms/token median ({e['ms_per_token_mean']:.2f} mean), "
              f"{e['ms_per_layer'] * 1e3:.0f} us/layer{bound}")  # fmt: skip
        if "parts_us" not in e:
            continue
        parts, layers = e["parts_us"], r["layers"]
        print(f"  profiled {e['profiled_us_per_token'] / 1e3:.2f} ms/token, {e['op_calls_per_token']:.0f} torch op "
              f"calls/token ({e['op_calls_per_token'] / layers:.0f}/layer)")  # fmt: skip
        for name, us in parts.items():
            print(f"  {name:<34}{us / 1e3:9.2f} ms/token{us / layers:9.0f} us/layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v2-lite", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers [default: the preset's]")
    parser.add_argument("--quant", default="q4")
    parser.add_argument("--dense", default="bf16")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--contexts", default="512,32768", help="comma-separated context lengths")
    parser.add_argument("--tokens", type=int, default=16, help="timed decode steps per context")
    parser.add_argument("--profile-tokens", type=int, default=4, help="profiled steps per context (0: none)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bandwidth-gib", type=float, default=2.0, help="read-bandwidth probe (0: skip)")
    parser.add_argument("--torch-formulas", action="store_true",
                        help="without krasis/common/kernels/cpu (the torch ops its kernels replace), for A/B runs")
    parser.add_argument("--kernel-context", type=int, default=attention.DECODE_KERNEL_CONTEXT,
                        help="longest context the decode attention kernel takes over one KV head (longer: torch GEMMs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    attention.DECODE_KERNEL_CONTEXT = args.kernel_context
    print(f"decode_profile: {' '.join(sys.argv[1:])}", file=sys.stderr, flush=True)
    result = run(args)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
