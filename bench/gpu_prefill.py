"""GPU prefill through a VRAM budget on a DeepSeek-V2-Lite-shaped model with random weights (a few layers):
checks streamed == resident, then times streamed and resident prefill next to the PCIe bound (streamed bytes /
pinned H2D rate) and the bf16 GEMM rate, all measured in this run. Logs to $OUT/gpu_prefill.json when set.

    python bench/gpu_prefill.py --layers 4 --quant q4 --budget 3 --tokens 2048 8192
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def gemm_tflops(m=8192, n=2816, k=2048) -> float:
    a, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b.t()
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b.t()
    torch.cuda.synchronize()
    return 2 * m * n * k * reps / (time.perf_counter() - start) / 1e12


def time_prefill(runner, tokens: int, repeats: int) -> float:
    prompt = torch.randint(0, runner.model.config.vocab_size, (tokens,)).tolist()
    runner.prefill_prompt(prompt)  # warm-up: Triton compiles, allocator settles
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        runner.prefill_prompt(prompt)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    from krasis.gpu_worker.prefill_cost import measure_pinned_link_rate
    from krasis.gpu_worker.prefill_runner import build_prefill_runner
    from krasis.bench.presets import DEEPSEEK_V2_LITE
    from krasis.bench.random_model import random_model
    from krasis.gpu_worker.vram_plan import GiB

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quant", default="q4", help="experts: q4, q8 or none")
    p.add_argument("--budget", type=float, default=3.0, help="GiB for the streamed run")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_prefill.py: needs a CUDA GPU")
    quant = None if args.quant == "none" else args.quant
    t0 = time.perf_counter()
    model = random_model(dict(DEEPSEEK_V2_LITE, num_hidden_layers=args.layers), torch.bfloat16, quant)
    print(f"model: V2-Lite shape, {args.layers} layers, experts {args.quant}, built in {time.perf_counter() - t0:.1f} s")
    link = measure_pinned_link_rate("cuda")
    tflops = gemm_tflops()
    print(f"pinned H2D {link / 1e9:.1f} GB/s; bf16 GEMM (8192x2816x2048) {tflops:.0f} TFLOP/s")
    result = {"link_GBps": link / 1e9, "gemm_tflops": tflops, "runs": []}
    step = max(args.tokens)
    streamed = build_prefill_runner(model, "cuda", args.budget, chunk_tokens=args.chunk, step_tokens=step)
    print(streamed.plan.describe())
    check = torch.randint(0, 102400, (min(step, 1024),)).tolist()
    streamed_hidden = streamed.prefill_prompt(check)
    streamed.close()
    del streamed
    torch.cuda.empty_cache()
    resident = build_prefill_runner(model, "cuda", None, chunk_tokens=args.chunk, step_tokens=step)
    equal = torch.equal(streamed_hidden, resident.prefill_prompt(check))
    print(f"streamed == resident hidden states: {equal}")
    result["streamed_equals_resident"] = equal
    for name, budget in (("resident", None), ("streamed", args.budget)):
        if name == "streamed":
            del resident
            torch.cuda.empty_cache()
        runner = resident if name == "resident" else build_prefill_runner(model, "cuda", budget, chunk_tokens=args.chunk, step_tokens=step)
        torch.cuda.reset_peak_memory_stats()
        for tokens in args.tokens:
            seconds = time_prefill(runner, tokens, args.repeats)
            bound = tokens * link / runner.plan.streamed_bytes if runner.plan.streams else float("inf")
            row = {"mode": name, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                   "pcie_bound_tok_s": bound, "streamed_GB": runner.plan.streamed_bytes / 1e9,
                   "peak_reserved_GiB": torch.cuda.max_memory_reserved() / GiB,
                   "budget_GiB": runner.plan.budget_bytes / GiB}  # fmt: skip
            result["runs"].append(row)
            print(f"{name:9s} {tokens:6d} tokens: {row['tok_s']:9.0f} tok/s  (PCIe bound {bound:9.0f} tok/s, "
                  f"{row['tok_s'] / bound:.0%} of it; streamed {row['streamed_GB']:.2f} GB; peak reserved "
                  f"{row['peak_reserved_GiB']:.2f} GiB)")  # fmt: skip
        if name == "streamed":
            runner.close()
    return result


if __name__ == "__main__":
    out = os.environ.get("OUT")
    try:
        result = main()
    except Exception as exc:  # noqa: BLE001 - a bench run must say what broke
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"bench/gpu_prefill.py failed: {result['error']}", file=sys.stderr)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_prefill.json"), "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(1 if "error" in result else 0)
