"""Where a streamed prompt's TTFT goes on the GPU: the `krasis-ctl bench` model (a preset's random quantized cache,
memory-mapped) through the same in-process serving path (tokenize, GpuPrefillCore into the shared KV pool), with
CUDA events at each expert group's copy (start, end: copy stream) and each layer's end (compute stream), and the
host's clock when it enqueued each layer. Prints, per prompt length, the timeline of the second of two runs, a summary:
host work before the first layer, copy time against the link rate, compute, time the compute stream waited for
copies, and the tail after the last layer (final norm, logits, the KV hand-off); and both runs' TTFT, whose
difference is what the first prompt of a length pays once (new shapes: allocator segments, cuDNN plans); and the
garbage collector's pauses during the prompt (--thaw: with the loaded objects back in its scans, as before the
pipeline froze them). --profile N then profiles the host (cProfile) through one more N-token prompt.

    python bench/stream_timeline.py --preset deepseek-v2-lite --budget 5 --tokens 512 8192 32768
"""

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from krasis.bench.models import prefill_setup  # noqa: E402
from krasis.bench.pipeline import BenchPipeline  # noqa: E402
from krasis.bench.presets import preset_config  # noqa: E402
from krasis.bench.prompts import prompt_text  # noqa: E402
from krasis.bench.random_weights import bench_model_dir, ensure_random_cache  # noqa: E402
from krasis.common.model_loader import load_model  # noqa: E402
from krasis.common.quant.plan import QuantPlan  # noqa: E402
from krasis.common.tokenizer import Tokenizer  # noqa: E402
from krasis.gpu_worker.prefill_cost import measure_pinned_link_rate  # noqa: E402
from krasis.gpu_worker.streaming import StreamingPrefill  # noqa: E402


class Timeline:
    """CUDA events and host times of one prefill, recorded through hooks on the runner and the model's layers."""

    def __init__(self, groups):
        self.groups = groups  # the plan's streamed groups of layers
        self.copies: list[tuple[list[torch.cuda.Event], torch.cuda.Event]] = []  # per group: (may start, ready)
        self.layers: list[tuple[int, torch.cuda.Event, float]] = []  # (layer, end event, host seconds)
        self.start_event, self.start_host = None, 0.0
        self.marks: dict[str, float] = {}  # host seconds at the step's start, the forward's start, the embedding's end

    def reset(self) -> None:
        self.copies.clear()
        self.layers.clear()
        self.marks.clear()
        self.start_event, self.start_host = _event(), time.perf_counter()

    def ms(self, event) -> float:
        return self.start_event.elapsed_time(event)


class GcPauses:
    """The garbage collector's collections in this process: (generation, host start, seconds)."""

    def __init__(self):
        self.pauses: list[tuple[int, float, float]] = []
        self._start = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], self._start, time.perf_counter() - self._start))

    def since(self, start: float) -> str:
        pauses = [(g, (t - start) * 1e3, s * 1e3) for g, t, s in self.pauses if t >= start]
        if not pauses:
            return "no collection"
        longest = max(pauses, key=lambda p: p[2])
        full = [p for p in pauses if p[0] == 2]
        return (f"{len(pauses)} collections, {sum(p[2] for p in pauses):.1f} ms ({len(full)} full, "
                f"{sum(p[2] for p in full):.1f} ms); longest {longest[2]:.1f} ms (generation {longest[0]}) "
                f"at {longest[1]:.1f} ms")  # fmt: skip


def full_collection_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - start) * 1e3


def _event(stream=None) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def instrument(core, runner: StreamingPrefill, timeline: Timeline) -> None:
    prefetch, release, released = runner._prefetch, runner._release, {}
    step, forward, embed = core.step, runner.forward, runner._embed

    def marked(name: str, fn):
        def call(*args, **kwargs):
            timeline.marks.setdefault(name, time.perf_counter())
            return fn(*args, **kwargs)

        return call

    def timed_embed(input_ids):
        rows = embed(input_ids)
        timeline.marks["embedded"] = time.perf_counter()
        return rows

    def timed_prefetch(g: int) -> None:
        starts = [_event(runner.copy_stream)]  # the copy starts after this and after the buffer's last user is done
        if g >= len(runner.buffers):
            starts.append(released[g - len(runner.buffers)])
        prefetch(g)
        timeline.copies.append((starts, _event(runner.copy_stream)))

    def timed_release(g: int) -> None:
        released[g] = _event()
        release(g)

    runner._prefetch, runner._release = timed_prefetch, timed_release
    core.step, runner.forward, runner._embed = marked("step", step), marked("forward", forward), timed_embed
    for i, layer in enumerate(runner.model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: timeline.layers.append((i, _event(), time.perf_counter())))


def report(timeline: Timeline, tokens: int, ttft: float, tokenize: float, link: float, group_bytes: list[int],
           gc_pauses: GcPauses) -> None:  # fmt: skip
    torch.cuda.synchronize()
    ends: dict[int, tuple[float, float]] = {}
    for i, event, host in timeline.layers:  # a layer's last chunk ends it
        ends[i] = (timeline.ms(event), (host - timeline.start_host) * 1e3)
    copies = [(max(timeline.ms(a) for a in starts), timeline.ms(b)) for starts, b in timeline.copies]
    print(f"\n{tokens} tokens: TTFT {ttft * 1e3:.1f} ms (tokenize {tokenize * 1e3:.1f} ms)")
    marks = (f"{name} {(t - timeline.start_host) * 1e3:.1f} ms" for name, t in timeline.marks.items())
    print("host at: " + ", ".join(marks))
    print(f"{'layer':>5} {'gpu end ms':>10} {'host ms':>8} {'layer ms':>8}   copy of its group: start-end ms (GB/s)")
    previous = 0.0
    group_of = {}
    for g, (layers, (start, end)) in enumerate(zip(timeline.groups, copies)):
        for i in layers:
            group_of[i] = (start, end, group_bytes[g] / max(end - start, 1e-6) / 1e6)
    for i, (gpu, host) in sorted(ends.items()):
        copy = group_of.get(i)
        text = f"{copy[0]:8.1f}-{copy[1]:.1f} ({copy[2]:.0f})" if copy else ""
        print(f"{i:>5} {gpu:>10.1f} {host:>8.1f} {gpu - previous:>8.1f}   {text}")
        previous = gpu
    first, last = min(ends.values())[0], max(e[0] for e in ends.values())
    copied = sum(group_bytes) / 1e9
    print(f"summary: start (tokenizing included) to the first layer's end {first:.1f} ms; "
          f"layers {last - first:.1f} ms after it; "
          f"streamed {copied:.2f} GB = {copied / link * 1e3:.1f} ms at the link's {link:.1f} GB/s; "
          f"after the last layer {ttft * 1e3 - last:.1f} ms (norm, logits, hand-off)")  # fmt: skip
    print(f"garbage collector during the prompt: {gc_pauses.since(timeline.start_host)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deepseek-v2-lite")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--quant", default="q4")
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 8192, 32768])
    p.add_argument("--thaw", action="store_true", help="undo the pipeline's gc.freeze of the loaded objects")
    p.add_argument("--profile", type=int, default=0, help="then profile the host through one prompt of this length")
    args = p.parse_args()
    raw = preset_config(args.preset, args.layers)
    plan, dtype = QuantPlan.parse(args.quant), torch.bfloat16
    model_dir = bench_model_dir(args.preset, raw, 0)
    ensure_random_cache(model_dir, plan, None)
    decode_model = load_model(model_dir, dtype=dtype, device="cpu", quant=plan, cache_root=None)
    prefill = prefill_setup(decode_model, "cuda", args.budget, args.chunk, max(args.tokens))
    print(prefill.plan)
    runner = prefill.runner
    timeline = Timeline(runner.plan.groups)
    group_bytes = [sum(runner.plan.layer_expert_bytes[i] for i in g) for g in runner.plan.groups]
    link = measure_pinned_link_rate("cuda") / 1e9
    tokenizer = Tokenizer.from_dir(model_dir)
    pipeline = BenchPipeline(prefill, decode_model, tokenizer, max(args.tokens) + 8, args.chunk, dtype)
    instrument(pipeline.prefill, runner, timeline)
    print(f"a full collection: {full_collection_ms():.1f} ms with the loaded objects frozen, ", end="")
    gc.unfreeze()
    print(f"{full_collection_ms():.1f} ms with them in its scans")
    if not args.thaw:
        gc.freeze()
    gc_pauses = GcPauses()
    try:
        for tokens in args.tokens:
            text = prompt_text(tokenizer, tokens, 0)
            ttfts = []
            for _ in range(2):  # the second run's timeline is reported; the first pays what a new length costs once
                torch.cuda.synchronize()
                timeline.reset()
                timing = pipeline.run(text, tokens, 0)
                ttfts.append(timing.ttft_s * 1e3)
            report(timeline, tokens, timing.ttft_s, timing.tokenize_s, link, group_bytes, gc_pauses)
            print(f"{tokens} tokens: first run TTFT {ttfts[0]:.1f} ms, second {ttfts[1]:.1f} ms")
        if args.profile:
            text = prompt_text(tokenizer, args.profile, 0)
            pipeline.run(text, args.profile, 0)
            profile = cProfile.Profile()
            profile.runcall(pipeline.run, text, args.profile, 0)
            for order, rows in (("cumulative", 40), ("tottime", 25)):
                print(f"\nhost profile of a {args.profile}-token prompt ({order}):")
                pstats.Stats(profile).sort_stats(order).print_stats(rows)
    finally:
        pipeline.close()


if __name__ == "__main__":
    main()
