"""Where GPU prefill time goes: torch.profiler over one prompt through a resident runner (V2-Lite shape cut to
a few layers, random q4 experts), top ops by GPU time and by CPU time, then the GPU's idle time: the gaps between its
kernels and copies, each charged to the krasis function that launched the work after it. Run on a GPU machine."""

import argparse
import json
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from krasis.bench.presets import DEEPSEEK_V2_LITE
from krasis.bench.random_model import random_model
from krasis.gpu_worker.prefill_runner import build_prefill_runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--by-shape", action="store_true", help="also the top ops by GPU time, each input shape apart")
    args = p.parse_args()
    model = random_model(dict(DEEPSEEK_V2_LITE, num_hidden_layers=args.layers), torch.bfloat16, "q4")
    runner = build_prefill_runner(model, "cuda", None, chunk_tokens=args.chunk, step_tokens=args.tokens)
    prompt = torch.randint(0, DEEPSEEK_V2_LITE["vocab_size"], (args.tokens,)).tolist()
    for _ in range(2):
        runner.prefill_prompt(prompt)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    runner.prefill_prompt(prompt)
    end.record()
    torch.cuda.synchronize()
    print(f"{args.layers} layers, {args.tokens} tokens: {start.elapsed_time(end):.1f} ms "
          f"({args.tokens / start.elapsed_time(end) * 1e3:.0f} tok/s)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                 record_shapes=args.by_shape) as prof:
        runner.prefill_prompt(prompt)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if args.by_shape:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cuda_time_total", row_limit=3 * args.rows, max_name_column_width=40,
                             max_shapes_column_width=110))
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        print_idle(json.load(open(trace.name))["traceEvents"])


def print_idle(events: list[dict], threshold_us: float = 5.0) -> None:
    """The GPU's idle gaps (over threshold_us) between its kernels, copies and sets, summed by the innermost krasis
    function on the host stack when the work after the gap was launched."""
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    # runtime launches (torch's kernels) and driver launches (Triton's, through cuLaunchKernelEx)
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    frames = [e for e in events if e.get("cat") == "python_function" and "krasis/" in e["name"]]
    idle, by_site, end = 0.0, defaultdict(lambda: [0, 0.0]), gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        gap = e["ts"] - end
        if gap > threshold_us:
            idle += gap
            launch = launches.get(e["args"].get("correlation"))
            site = "(no launch found)"
            if launch is not None:
                enclosing = [f for f in frames if f["tid"] == launch["tid"] and f["ts"] <= launch["ts"] <= f["ts"] + f["dur"]]
                site = max(enclosing, key=lambda f: f["ts"])["name"] if enclosing else "(outside krasis)"
            by_site[site][0] += 1
            by_site[site][1] += gap
        end = max(end, e["ts"] + e["dur"])
    span = end - gpu[0]["ts"]
    print(f"\nGPU idle {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms from its first kernel to its last "
          f"(gaps over {threshold_us:.0f} us), by the function that launched the next work:")
    for site, (count, total) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"  {total / 1e3:8.2f} ms {count:6d} gaps  {site}")


if __name__ == "__main__":
    main()
