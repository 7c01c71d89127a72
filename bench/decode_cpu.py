"""CPU decode speed of the unquantized engine path on a DeepSeek-V2-Lite-shaped model with random weights.

Prints decode tok/s next to the memory-bandwidth bound (read bandwidth measured in this run divided by
the bytes one token must read), so a kernel is judged in GB/s, not in isolation.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from krasis.bench.limits import read_bandwidth
from krasis.bench.presets import preset_config
from krasis.common.engine import EngineConfig, EngineCore
from krasis.common.layers.moe import StackedExperts
from krasis.common.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM
from krasis.common.quant.formats import QuantSpec, quantize
from krasis.common.sampling_params import SamplingParams

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GB = 1e9


def build_random_model(
    cfg: DeepseekV2Config, dtype: torch.dtype, seed: int = 0, experts: str | None = None
) -> DeepseekV2ForCausalLM:
    """Build on meta, allocate straight in `dtype` (no fp32 copy first), fill with N(0, 1/fan_in); norms 1. With
    `experts` (a quant spec, e.g. "q4"), each layer's routed experts are quantized as soon as they are filled, as the
    quantized cache serves them (the float copy is dropped layer by layer)."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg).to(dtype)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name in [name for name, _ in model.named_parameters()]:  # names only: a quantized float copy is freed
        param = model.get_parameter(name)
        if name.endswith(model.fp32_parameters):
            param.data = torch.empty(param.shape, dtype=torch.float32)
        if param.dim() == 1:
            param.data.fill_(1.0)
        else:
            # Weights are [..., out, in]: the last dim is the fan-in, which keeps activations O(1) per layer.
            param.data.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)
        if experts is not None and name.endswith(".mlp.experts.down_proj"):  # a layer's experts are all filled
            module = model.get_submodule(name.rsplit(".", 1)[0])
            for part in ("gate_up_proj", "down_proj"):
                module.use_quantized(part, quantize(getattr(module, part).data, QuantSpec.parse(experts)))
    return model.eval().requires_grad_(False)


def param_group(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embedding (1 row)"
    if ".mlp.experts." in name:
        return "routed experts (top-k)"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "router (fp32)"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense MLP"
    return "lm_head"


def bytes_per_token(model: DeepseekV2ForCausalLM, context: float) -> dict[str, float]:
    """Bytes one batch-1 decode token must read, by group: every weight it touches once, plus the KV cache."""
    cfg = model.config
    groups: dict[str, float] = {}
    for name, param in model.named_parameters():
        group = param_group(name)
        size = param.numel() * param.element_size()
        if group == "embedding (1 row)":
            size = param.shape[-1] * param.element_size()
        elif group == "routed experts (top-k)":
            size *= cfg.num_experts_per_tok / cfg.n_routed_experts
        groups[group] = groups.get(group, 0.0) + size
    for module in model.modules():  # quantized routed experts are no longer parameters
        if isinstance(module, StackedExperts):
            stored = sum(weight.nbytes for weight in module.quantized.values())
            group = "routed experts (top-k)"
            groups[group] = groups.get(group, 0.0) + stored * cfg.num_experts_per_tok / cfg.n_routed_experts
    kv_width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    groups["KV cache (latent + k_pe)"] = context * kv_width * model.lm_head.weight.element_size() * len(model.kv_widths)
    return groups


def weights_bytes(model) -> int:
    """Parameters plus quantized routed experts, as stored."""
    quantized = sum(w.nbytes for m in model.modules() if isinstance(m, StackedExperts) for w in m.quantized.values())
    return sum(p.numel() * p.element_size() for p in model.parameters()) + quantized


def mla_decode_flops(cfg: DeepseekV2Config, context: float) -> float:
    """FLOPs per decode token of absorbed MLA attention: W_UK and W_UV per head, scores and the latent sum over the context."""
    rank, kv_b_width = cfg.kv_lora_rank, cfg.qk_nope_head_dim + cfg.v_head_dim
    per_head = kv_b_width * rank + context * (2 * rank + cfg.qk_rope_head_dim)
    return 2 * cfg.num_attention_heads * per_head * cfg.num_hidden_layers


def fill_random_context(engine: EngineCore, context: int, seed: int = 2) -> None:
    """Admit the waiting sequences and mark all but the last prompt token of each cached, with N(0, 1) KV in their
    pages: decode at a long context without a long CPU prefill (attention reads the same bytes whatever they hold)."""
    engine._admit()  # the engine's own page reservations for the requests, as its first step would make
    gen = torch.Generator().manual_seed(seed)
    for seq in engine.running:
        slots = engine.kv.slots(seq.page_table, 0, context - 1)
        for layer in engine.kv.layers:
            layer[slots] = torch.randn(context - 1, layer.shape[1], generator=gen).to(layer.dtype)
        seq.num_cached = context - 1


def run_engine(model, cfg: DeepseekV2Config, prompt_tokens: int, decode_tokens: int, random_context: bool,
               batch: int = 1) -> dict:  # fmt: skip
    """Prefill `batch` random prompts (the step that completes them yields their first tokens), or only their last
    token over random KV, then time `decode_tokens` decode steps of all `batch` sequences together."""
    max_context = prompt_tokens + decode_tokens + 1
    pages = batch * -(-max_context // 16)
    engine = EngineCore(model, EngineConfig(max_context, kv_pages=pages), frozenset(), cfg.vocab_size)
    gen = torch.Generator().manual_seed(1)
    for i in range(batch):
        prompt = torch.randint(cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()
        engine.add(f"bench-{i}", prompt, SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True))
    if random_context:
        fill_random_context(engine, prompt_tokens)
    start, cpu_start = time.perf_counter(), time.process_time()
    while any(seq.num_generated == 0 for seq in engine.waiting + engine.running):  # until every first token
        engine.step()
    prefill_s, prefill_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    step_s, cpu_start = [], time.process_time()
    while engine.has_work:
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
    decode_cpu_s = time.process_time() - cpu_start
    prefilled = batch * (1 if random_context else prompt_tokens)
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": prefilled / prefill_s,
        "prefill_cpu_util": cpu_util(prefill_cpu_s, prefill_s),
        "decode_tok_s": batch * len(step_s) / sum(step_s),
        "decode_ms_per_step": 1e3 * sum(step_s) / len(step_s),
        "decode_ms_per_step_median": 1e3 * statistics.median(step_s),
        "decode_cpu_util": cpu_util(decode_cpu_s, sum(step_s)),
    }


def cpu_util(cpu_s: float, wall_s: float) -> float:
    """Share of our threads' time we actually ran: below ~95% another process took cores, so the run is suspect."""
    return cpu_s / (wall_s * torch.get_num_threads())


def print_breakdown(result: dict) -> None:
    print(f"bytes read per decoded token (mean context {result['mean_context']:.0f}):")
    for group, size in sorted(result["bytes_per_token"].items(), key=lambda kv: -kv[1]):
        print(f"  {group:<26} {size / 1e6:10.1f} MB")
    print(f"  {'total':<26} {result['bytes_per_token_total'] / 1e6:10.1f} MB")
    print(f"MLA absorbed attention: {result['mla_decode_gflop']:.2f} GFLOP/token (the KV cache bytes above are its reads)")


def print_table(r: dict) -> None:
    rows = [
        ("decode tok/s", f"{r['decode_tok_s']:.2f}", f"{r['decode_bound_tok_s']:.1f} (bandwidth bound)",
         f"{r['decode_ratio']:.1%}"),
        ("decode GB/s effective", f"{r['decode_gbs']:.2f}", f"{r['bandwidth_gbs_best']:.1f} (read bandwidth)",
         f"{r['decode_ratio']:.1%}"),
        ("decode ms/step (median)", f"{r['decode_ms_per_step']:.1f} ({r['decode_ms_per_step_median']:.1f})",
         f"{r['batch'] * 1e3 / r['decode_bound_tok_s']:.1f}", ""),
        ("decode ms/layer (median)", f"{r['decode_ms_per_layer_median']:.2f}", "(step incl. lm_head / layers)", ""),
        ("prefill tok/s", f"{r['prefill_tok_s']:.1f}", "", ""),
        ("CPU use prefill / decode", f"{r['prefill_cpu_util']:.0%} / {r['decode_cpu_util']:.0%}", "100%", ""),
        ("peak RSS GB", f"{r['peak_rss_gb']:.2f}", f"weights {r['weights_gb']:.2f}", ""),
    ]
    batch_note = " (tok/s summed; the bound is one sequence's)" if r["batch"] > 1 else ""
    print(f"\n{r['layers']} layers, {r['dtype']}, experts {r['experts'] or r['dtype']}, {r['threads']} threads, "
          f"batch {r['batch']}{batch_note}, "
          f"prompt {r['prompt_tokens']}{' (random KV, last token prefilled)' if r['random_context'] else ''}, "
          f"decode {r['decode_tokens']}; "
          f"read bandwidth best {r['bandwidth_gbs_best']:.1f} / median {r['bandwidth_gbs_median']:.1f} GB/s")
    print(f"{'metric':<26}{'measured':>14}{'limit':>34}{'ratio':>8}")
    for metric, measured, limit, ratio in rows:
        print(f"{metric:<26}{measured:>14}{limit:>34}{ratio:>8}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=0,
                        help="decode after this many cached tokens of random KV (the prefill runs only the last one)"
                        " instead of prefilling --prompt-tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--experts", default=None, help="quantize the routed experts (q4, q8; issue 5 measures q4)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bandwidth-gib", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.context:
        args.prompt_tokens = args.context
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress never pollutes --json
    # Bandwidth first, before the weights exist, so the 2 GiB buffer doesn't add to the peak RSS.
    log(f"measuring read bandwidth ({args.bandwidth_gib} GiB, {args.threads} threads)...")
    best_gbs, median_gbs = read_bandwidth(args.bandwidth_gib)
    cfg = DeepseekV2Config.from_hf(preset_config("deepseek-v2-lite", args.layers))
    log(f"building {args.layers}-layer model in {args.dtype} with random weights...")
    start = time.perf_counter()
    model = build_random_model(cfg, DTYPES[args.dtype], experts=args.experts)
    build_s = time.perf_counter() - start
    log(f"built in {build_s:.1f} s; prefill {args.prompt_tokens} + decode {args.decode_tokens} tokens...")
    timings = run_engine(model, cfg, args.prompt_tokens, args.decode_tokens, bool(args.context), args.batch)

    mean_context = args.prompt_tokens + (args.decode_tokens + 1) / 2  # each decode step attends to all before it
    groups = bytes_per_token(model, mean_context)
    total = sum(groups.values())
    result = {
        "layers": args.layers, "dtype": args.dtype, "experts": args.experts, "threads": args.threads,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "random_context": bool(args.context),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_gb": weights_bytes(model) / GB,
        "build_s": build_s, "bandwidth_gbs_best": best_gbs, "bandwidth_gbs_median": median_gbs,
        "mean_context": mean_context, "bytes_per_token": groups, "bytes_per_token_total": total,
        "mla_decode_gflop": mla_decode_flops(cfg, mean_context) / GB,
        **timings,
        "decode_bound_tok_s": best_gbs * GB / total,
        "decode_gbs": timings["decode_tok_s"] * total / GB,
        "decode_ms_per_layer_median": timings["decode_ms_per_step_median"] / args.layers,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,  # Linux: KiB
    }
    result["decode_ratio"] = result["decode_tok_s"] / result["decode_bound_tok_s"]
    if args.json:
        print(json.dumps(result))
        return
    print_breakdown(result)
    print_table(result)


if __name__ == "__main__":
    main()
