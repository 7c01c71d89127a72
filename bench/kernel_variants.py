"""A/B of CPU kernel builds: other compile-time constants (rows per tile, prefetch distance, work item sizes) or
another git revision's kernels, timed in turns on the V2-Lite MoE layer call and one large matrix, next to read
bandwidth. Medians over --repeats rounds; each round times every variant once, so drift hits all alike. Each
variant's results are also compared bit for bit with the first variant's.

    python bench/kernel_variants.py --threads 16 --variant git:HEAD --variant default --variant KRASIS_MOE_GUIDE=0

The MoE call's work plan (csrc/moe_plan.h) is swept through KRASIS_MOE_ITEMS_PER_THREAD and KRASIS_MOE_GUIDE; the
tiles through KRASIS_NR and KRASIS_PREFETCH.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import GB, STREAM_SHAPE, V2_LITE_EXPERTS, random_quantized, time_calls  # noqa: E402

from krasis.bench.limits import read_bandwidth  # noqa: E402
from krasis.common.quant.cpu_kernels import FORMAT_CODES, build_extension  # noqa: E402
from krasis.common.quant.formats import QuantSpec  # noqa: E402

CSRC = "krasis/common/quant/csrc"
TOKENS = (1, 16)


def build_variant(variant: str, scratch: Path):
    """'default', 'NAME=VALUE[,NAME=VALUE]' or 'git:REV' (that revision's csrc/, as committed)."""
    if variant == "default":
        return build_extension()
    if not variant.startswith("git:"):
        return build_extension(defines=tuple(variant.split(",")))
    rev, repo = variant[4:], Path(__file__).resolve().parent.parent
    target = scratch / rev
    target.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{CSRC}"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in names:
        blob = subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"], cwd=repo, check=True, capture_output=True)
        (target / name).write_bytes(blob.stdout)
    return build_extension(source_dir=target)


def experts_case(fmt: str, tokens: int, gen: torch.Generator):
    """(bytes a call reads, fn(ops, i) making call i): bf16 x, weights cycled over 6 layers, 32 routings."""
    num_experts, inter, hidden, top_k = V2_LITE_EXPERTS
    spec, code = QuantSpec(fmt), FORMAT_CODES[fmt]
    stacks = [(random_quantized(spec, (num_experts, 2 * inter, hidden), gen),
               random_quantized(spec, (num_experts, hidden, inter), gen)) for _ in range(6)]  # fmt: skip
    per_expert = (stacks[0][0].nbytes + stacks[0][1].nbytes) / num_experts
    routes = [torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
              for _ in range(32)]  # fmt: skip
    x, weights = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16), torch.rand(tokens, top_k)
    hit = sum(len(torch.unique(r)) for r in routes) / len(routes)

    def call(ops, i):
        gu, dn = stacks[i % len(stacks)]
        return ops.experts(x, gu.qweight, gu.scales, code, spec.group_for(hidden), dn.qweight, dn.scales, code,
                           spec.group_for(inter), routes[i % len(routes)], weights)  # fmt: skip

    return hit * per_expert, call


def stream_case(fmt: str, gen: torch.Generator):
    k, n = STREAM_SHAPE
    spec = QuantSpec(fmt)
    w = random_quantized(spec, (1, n, k), gen)[0]
    x = torch.randn(1, k, generator=gen)
    return w.nbytes, lambda ops, i: ops.linear(x, w.qweight, w.scales, FORMAT_CODES[fmt], spec.group_for(k))


def first_output(call, ops) -> torch.Tensor:
    out = call(ops, 0)
    return out[0] if isinstance(out, (tuple, list)) else out  # experts: (out, status)


def differences(cases: dict, builds: dict) -> dict[str, list[str]]:
    """Per variant, the cases whose first call's result differs in any bit from the first variant's."""
    (_, reference), *others = builds.items()
    expected = {case: first_output(call, reference) for case, (_, call) in cases.items()}
    return {variant: [case for case, (_, call) in cases.items()
                      if not torch.equal(first_output(call, ops), expected[case])]
            for variant, ops in others}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variant", action="append", default=[], help="'default', NAME=VALUE[,NAME=VALUE] or git:REV")
    p.add_argument("--formats", default="q4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.3)
    p.add_argument("--no-stream", action="store_true", help="skip the large-matrix case")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variant or ["default"]
    scratch = Path(tempfile.gettempdir()) / "krasis-kernel-variants"  # a stable path: its builds are reused
    builds = {}
    for variant in variants:
        try:
            builds[variant] = build_variant(variant, scratch)
        except (OSError, subprocess.CalledProcessError) as exc:  # no git, or no such revision here
            print(f"{variant}: skipped ({exc})", flush=True)
    variants = list(builds)
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for fmt in args.formats.split(","):
        cases |= {f"{fmt} experts T={t}": experts_case(fmt, t, gen) for t in TOKENS}
        if not args.no_stream:
            cases[f"{fmt} stream M=1"] = stream_case(fmt, gen)
    rates, bandwidth = {}, []
    for _ in range(args.repeats):
        bandwidth.append(read_bandwidth(1.0)[0])
        for case, (nbytes, call) in cases.items():
            for variant, ops in builds.items():
                seconds, _ = time_calls([lambda i, ops=ops: call(ops, i)], lambda i: (i,), args.min_seconds)
                rates.setdefault((case, variant), []).append(nbytes / seconds / GB)
    best = max(bandwidth)
    print(f"read bandwidth best {best:.1f} GB/s, median {statistics.median(bandwidth):.1f} ({args.threads} threads); "
          f"GB/s median of {args.repeats} (of best bandwidth) [min-max]")
    width = max(28, *(len(v) + 2 for v in variants))
    print(f"{'case':<20}" + "".join(f"{v:>{width}}" for v in variants))
    for case in cases:
        cells = []
        for variant in variants:
            r = rates[case, variant]
            cells.append(f"{statistics.median(r):.1f} ({statistics.median(r) / best:.0%}) [{min(r):.0f}-{max(r):.0f}]")
        print(f"{case:<20}" + "".join(f"{c:>{width}}" for c in cells), flush=True)
    for variant, differing in differences(cases, builds).items():
        print(f"{variant}: " + (f"differs from {variants[0]} in {', '.join(differing)}" if differing
                                else f"same bits as {variants[0]}"))  # fmt: skip


if __name__ == "__main__":
    main()
