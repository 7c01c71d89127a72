"""A whole benchmark run: limits first, then the random-weight cache and models, the timed requests, the figures."""

import os
import sys
import time
from dataclasses import dataclass

import torch

from krasis.bench import BenchError
from krasis.bench.accounting import decode_bytes_per_token, expert_shape, prefill_flops
from krasis.bench.limits import gemm_rate, pinned_to_gpu_bandwidth, read_bandwidth
from krasis.bench.models import peak_memory, prefill_setup
from krasis.bench.pipeline import BenchPipeline
from krasis.bench.presets import preset_config
from krasis.bench.prompts import prompt_text
from krasis.bench.random_weights import bench_model_dir, ensure_random_cache
from krasis.bench.report import Figure, decode_figure, memory_figures, prefill_figures
from krasis.common.model_loader import load_model, resolve_dtype
from krasis.common.quant.plan import QuantPlan
from krasis.common.tokenizer import Tokenizer

GB = 1e9
WARMUP_TOKENS = 64  # one short request first: kernel selection, thread pools, the cache's first page faults


@dataclass(frozen=True)
class BenchOptions:
    preset: str
    layers: int | None = None
    device: str = "cpu"
    quant: str = "q4"
    dense_quant: str = "bf16"
    dtype: str = "bf16"
    prompt_tokens: tuple[int, ...] = (2048, 8192, 32768)
    decode_contexts: tuple[int, ...] = (512, 32768)
    decode_tokens: int = 64
    chunk_tokens: int = 16384
    vram_budget_gib: float | None = None
    seed: int = 0
    cache_dir: str | None = None
    bandwidth_gib: float = 2.0
    compare_transformers: bool = False

    @property
    def lengths(self) -> list[int]:
        """Every prompt the run prefills: the prefill lengths and the decode contexts."""
        return sorted(set(self.prompt_tokens) | set(self.decode_contexts))


def log(message: str) -> None:
    print(f"krasis bench: {message}", file=sys.stderr, flush=True)


def run_bench(options: BenchOptions) -> tuple[dict, list[Figure]]:
    """-> (the run's description, limits and details; its figures)."""
    raw = preset_config(options.preset, options.layers)
    _check(options, raw)
    limits = _measure_bandwidths(options)  # before the weights exist: its buffer stays out of the peak RSS
    plan, dtype = QuantPlan.parse(options.quant, options.dense_quant), resolve_dtype(options.dtype)
    model_dir = bench_model_dir(options.preset, raw, options.seed)
    log(f"random weights -> quantized cache ({plan.tag}) for {model_dir.name}")
    cache = ensure_random_cache(model_dir, plan, options.cache_dir)
    decode_model = load_model(model_dir, dtype=dtype, device="cpu", quant=plan, cache_root=options.cache_dir)
    prefill = prefill_setup(decode_model, options.device, options.vram_budget_gib, options.chunk_tokens,
                            max(options.lengths))  # fmt: skip
    log(f"prefill plan: {prefill.plan}")
    tokenizer = Tokenizer.from_dir(model_dir)
    timings, first_ttft = _time_requests(prefill, decode_model, tokenizer, options, dtype)
    peaks = peak_memory(options.device)  # of the requests: the GEMM-rate probes and the reference come after
    streamed = prefill.streamed_bytes
    figures, bytes_per_token = _figures(decode_model, timings, first_ttft, options, dtype, limits, streamed)
    figures += _memory(options, peaks)
    result = {
        "preset": options.preset, "model_type": raw["model_type"], "layers": raw["num_hidden_layers"],
        "device": options.device, "quant": plan.to_json(), "dtype": options.dtype, "threads": torch.get_num_threads(),
        "seed": options.seed, "prefill_plan": prefill.plan, "streamed_bytes": prefill.streamed_bytes,
        "cache": {"path": str(cache), "bytes": sum(f.stat().st_size for f in cache.iterdir())},
        "limits": limits, "limits_text": _limits_text(limits),
        "timings": {
            n: {**vars(t), "decode_s": t.decode_s, "first_ttft_s": first_ttft.get(n)} for n, t in timings.items()
        },
        "decode_bytes_per_token": bytes_per_token, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }  # fmt: skip
    if options.compare_transformers:
        from krasis.bench.transformers_side import compare_transformers

        if prefill.runner is not None:
            prefill.runner.close()
        del prefill  # the device copy makes room for the reference
        result["transformers"] = compare_transformers(model_dir, decode_model, tokenizer, options)
    return result, figures


def _check(options: BenchOptions, raw: dict) -> None:
    if options.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is available")
    longest = max(options.lengths) + options.decode_tokens + 2
    if longest > raw["max_position_embeddings"]:
        raise BenchError(f"a {max(options.lengths)}-token prompt plus {options.decode_tokens} decoded tokens exceeds "
                         f"the preset's {raw['max_position_embeddings']}-token context")
    if min(options.lengths) < 1 or options.decode_tokens < 1:
        raise BenchError("prompt lengths, decode contexts and --decode-tokens must be positive")


def _measure_bandwidths(options: BenchOptions) -> dict:
    log(f"measuring CPU read bandwidth ({options.bandwidth_gib} GiB, {torch.get_num_threads()} threads)")
    best, median = read_bandwidth(options.bandwidth_gib)
    limits = {"cpu_read_gbs_best": best, "cpu_read_gbs_median": median, "gemm_tflops": {}}
    if options.device == "cuda":
        limits["pinned_h2d_gbs"] = pinned_to_gpu_bandwidth()
        limits["gpu"] = torch.cuda.get_device_name()
    return limits


def _time_requests(prefill, decode_model, tokenizer, options: BenchOptions, dtype) -> dict:
    texts = {n: prompt_text(tokenizer, n, options.seed + n) for n in [WARMUP_TOKENS, *options.lengths]}
    max_tokens = max(options.lengths) + options.decode_tokens + 2
    pipeline = BenchPipeline(prefill, decode_model, tokenizer, max_tokens, options.chunk_tokens, dtype)
    try:
        pipeline.run(texts[WARMUP_TOKENS], WARMUP_TOKENS, 2)
        if options.device == "cuda":  # peaks of the requests alone: the bandwidth probe's buffers left the cache
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timings, first = {}, {}
        for n in options.lengths:
            log(f"prompt of {n} tokens")
            if n in options.prompt_tokens:  # the first prompt of a length pays its new shapes once (cuDNN plans,
                first[n] = pipeline.run(texts[n], n, 0).ttft_s  # allocator segments): timed apart from the figures'
            timings[n] = pipeline.run(texts[n], n, options.decode_tokens if n in options.decode_contexts else 0)
        return timings, first
    finally:
        pipeline.close()


def _figures(model, timings: dict, first_ttft: dict, options: BenchOptions, dtype, limits: dict, streamed_bytes: int):
    """-> (prefill, TTFT, decode and memory figures; bytes per decoded token by part, per context)."""
    figures, bytes_per_token = [], {}
    for tokens in options.prompt_tokens:
        bounds = _prefill_bounds(model, tokens, options, dtype, limits, streamed_bytes)
        figures += prefill_figures(tokens, timings[tokens].ttft_s, bounds, first_ttft[tokens])
    for context in options.decode_contexts:
        mean_context = context + options.decode_tokens // 2
        bytes_per_token[context] = decode_bytes_per_token(model, mean_context, dtype.itemsize)
        tok_s = options.decode_tokens / timings[context].decode_s
        total = sum(bytes_per_token[context].values())
        figures.append(decode_figure(context, tok_s, limits["cpu_read_gbs_best"], total))
    return figures, bytes_per_token


def _prefill_bounds(model, tokens: int, options: BenchOptions, dtype, limits: dict, streamed_bytes: int) -> dict:
    """tok/s bounds of one prompt: compute (its FLOPs at the GEMM rates measured at its shapes), PCIe if it streams."""
    shape, flops = expert_shape(model), prefill_flops(model, tokens)
    rows = shape.tokens_per_expert(tokens)
    expert_rate = gemm_rate(rows, shape.hidden, 2 * shape.intermediate, options.device, dtype)
    other_rate = gemm_rate(tokens, shape.hidden, shape.hidden, options.device, dtype)
    limits["gemm_tflops"][tokens] = {"expert_rows": rows, "experts": expert_rate / 1e12, "other": other_rate / 1e12}
    bounds = {"compute": tokens / (flops["experts"] / expert_rate + flops["other"] / other_rate)}
    if streamed_bytes:
        bounds["PCIe"] = tokens * limits["pinned_h2d_gbs"] * GB / streamed_bytes
    return bounds


def _memory(options: BenchOptions, peaks: dict[str, float]) -> list[Figure]:
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    if options.device != "cuda":
        return memory_figures(peaks, ram_gb, None, "")
    if options.vram_budget_gib is not None:
        return memory_figures(peaks, ram_gb, options.vram_budget_gib * 2**30 / GB, "--vram-budget")
    device_gb = torch.cuda.get_device_properties(0).total_memory / GB
    return memory_figures(peaks, ram_gb, device_gb, "GPU memory")


def _limits_text(limits: dict) -> dict[str, str]:
    best, median = limits["cpu_read_gbs_best"], limits["cpu_read_gbs_median"]
    text = {"CPU read bandwidth": f"{best:.1f} GB/s best, {median:.1f} median"}
    if "pinned_h2d_gbs" in limits:
        text["pinned host->GPU"] = f"{limits['pinned_h2d_gbs']:.1f} GB/s ({limits['gpu']})"
    for tokens, rates in limits["gemm_tflops"].items():
        text[f"GEMM at {tokens}"] = (f"{rates['experts']:.3g} TFLOP/s per expert ({rates['expert_rows']} rows), "
                                     f"{rates['other']:.3g} dense ({tokens} rows)")
    return text
