"""Tuning sweep for the CPU quant kernels: build variants with other compile-time constants (rows per tile,
prefetch distance) and time the V2-Lite MoE layer call and one large matrix for each, next to read bandwidth.

    python bench/kernel_variants.py --threads 16 --variant default --variant KRASIS_NR=8 --variant KRASIS_PREFETCH=4096
"""

import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from kernels import GB, STREAM_SHAPE, V2_LITE_EXPERTS, random_quantized, time_calls  # noqa: E402

from krasis.bench.limits import read_bandwidth  # noqa: E402
from krasis.common.quant.cpu_kernels import FORMAT_CODES, build_extension  # noqa: E402
from krasis.common.quant.formats import QuantSpec  # noqa: E402


def experts_rate(ops, fmt: str, tokens: int, gen: torch.Generator, min_seconds: float) -> float:
    num_experts, inter, hidden, top_k = V2_LITE_EXPERTS
    spec = QuantSpec(fmt)
    stacks = [(random_quantized(spec, (num_experts, 2 * inter, hidden), gen),
               random_quantized(spec, (num_experts, hidden, inter), gen)) for _ in range(6)]
    per_expert = (stacks[0][0].nbytes + stacks[0][1].nbytes) / num_experts
    routes = [torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]) for _ in range(32)]
    x, weights, code = torch.randn(tokens, hidden, generator=gen), torch.rand(tokens, top_k), FORMAT_CODES[fmt]

    def call(ids, gu, dn):
        return ops.experts(x, gu.qweight, gu.scales, code, spec.group_for(hidden), dn.qweight, dn.scales, code,
                           spec.group_for(inter), ids, weights)

    calls = [lambda ids, gu=gu, dn=dn: call(ids, gu, dn) for gu, dn in stacks]
    seconds = time_calls(calls, lambda i: (routes[i % len(routes)],), min_seconds)
    hit = sum(len(torch.unique(r)) for r in routes) / len(routes)
    return hit * per_expert / seconds / GB


def stream_rate(ops, fmt: str, gen: torch.Generator, min_seconds: float) -> float:
    k, n = STREAM_SHAPE
    spec = QuantSpec(fmt)
    w = random_quantized(spec, (1, n, k), gen)[0]
    x = torch.randn(1, k, generator=gen)
    seconds = time_calls([lambda: ops.linear(x, w.qweight, w.scales, FORMAT_CODES[fmt], spec.group_for(k))], lambda i: (), min_seconds)
    return w.nbytes / seconds / GB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variant", action="append", default=[], help="'default' or NAME=VALUE[,NAME=VALUE]")
    p.add_argument("--formats", default="q4")
    p.add_argument("--min-seconds", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    best, _ = read_bandwidth(2.0)
    print(f"read bandwidth {best:.1f} GB/s ({args.threads} threads)")
    print(f"{'variant':<36}{'fmt':>4}{'experts T=1':>13}{'T=16':>8}{'stream M=1':>12}")
    for variant in args.variant or ["default"]:
        defines = () if variant == "default" else tuple(variant.split(","))
        ops = build_extension(defines=defines)
        for fmt in args.formats.split(","):
            gen = torch.Generator().manual_seed(0)
            one, sixteen = (experts_rate(ops, fmt, t, gen, args.min_seconds) for t in (1, 16))
            stream = stream_rate(ops, fmt, gen, args.min_seconds)
            print(f"{variant:<36}{fmt:>4}{one:>8.1f} ({one / best:.0%}){sixteen:>8.1f}{stream:>7.1f} ({stream / best:.0%})",
                  flush=True)


if __name__ == "__main__":
    main()
