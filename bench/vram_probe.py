"""Where prefill VRAM goes: per-layer peak allocated/reserved of a streamed run against its VRAM plan
(V2-Lite shape cut to a few layers, random q4 experts). Run on a GPU machine; prints one line a layer."""

import argparse

import torch

from krasis.bench.presets import DEEPSEEK_V2_LITE
from krasis.bench.random_model import random_model
from krasis.gpu_worker.prefill_runner import build_prefill_runner
from krasis.gpu_worker.vram_plan import GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--budget", type=float, default=2.9)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    model = random_model(dict(DEEPSEEK_V2_LITE, num_hidden_layers=args.layers), torch.bfloat16, "q4")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    runner = build_prefill_runner(model, "cuda", args.budget, chunk_tokens=args.chunk, step_tokens=args.tokens)
    print(runner.plan.describe())
    print(f"after build: allocated {(torch.cuda.memory_allocated() - base) / GiB:.2f} GiB, "
          f"reserved {torch.cuda.memory_reserved() / GiB:.2f} GiB")
    torch.cuda.reset_peak_memory_stats()

    def after_layer(i: int) -> None:
        torch.cuda.synchronize()
        print(f"layer {i:2d}: peak allocated {(torch.cuda.max_memory_allocated() - base) / GiB:.2f} GiB, "
              f"reserved {torch.cuda.memory_reserved() / GiB:.2f} GiB")
        torch.cuda.reset_peak_memory_stats()

    from krasis.gpu_worker.kv_handoff import layer_staging
    from krasis.gpu_worker.streaming import PromptSequence, chunk_batches

    prompt = torch.randint(0, 102400, (args.tokens,)).tolist()
    with torch.inference_mode():
        pages = -(-args.tokens // 16)
        kv = layer_staging(runner.model.kv_widths, pages * 16, 16, torch.bfloat16, "cuda", runner.model.state_widths, 1)
        print(f"KV staging (two layer buffers) {2 * max(t.nbytes for t in kv.layers) / GiB:.3f} GiB")
        seq = PromptSequence(prompt, list(range(pages)), state_slot=0)
        ids, chunks, _ = chunk_batches([(seq, len(prompt))], kv, "cuda", runner.plan.chunk_tokens)
        runner.forward(ids, chunks, after_layer=after_layer)
    print(torch.cuda.memory_summary(abbreviated=True))


if __name__ == "__main__":
    main()
