"""Where GPU prefill time goes: torch.profiler over one prompt through a resident runner (V2-Lite shape cut to
a few layers, random q4 experts), top ops by GPU time and by CPU time. Run on a GPU machine."""

import argparse

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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.prefill_prompt(prompt)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
