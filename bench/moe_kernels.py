"""Routed-expert kernels at prefill sizes on the GPU: the fused Triton dequant-GEMMs (q4, q8, bf16 weights as
stored; quantized ones also dequantized first, a scratch of experts at a time, into the bf16 kernels) and the older
dequantize-a-block-then-grouped-GEMM path, against torch._grouped_mm on bf16 weights already in memory (the compute
ceiling of a grouped GEMM at these shapes), all timed in this run; and the dequantizing pass alone, in GB/s.

    python bench/moe_kernels.py --shape v2-lite --tokens 2048 8192 [--sweep q4 bf16]

--sweep times each kernel's tile choices (BLOCK_N, BLOCK_K, warps, stages) for those weight formats, the other
kernel at its default: the table that `fused_moe.TILES` is read from.
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from krasis.common.kernels.gpu.dequant import dequantize_into  # noqa: E402
from krasis.common.kernels.gpu.fused_moe import block_rows, fused_experts, tiles_valid  # noqa: E402
from krasis.common.kernels.gpu.moe import grouped_experts  # noqa: E402
from krasis.common.quant.formats import QuantSpec, quantize  # noqa: E402

SHAPES = {"v2-lite": (64, 2048, 1408, 6), "qwen3-next": (512, 2048, 512, 10), "qwen3-235b": (128, 4096, 1536, 8)}


def grouped_ceiling(x, gate_up, down, ids) -> float:
    """ms of the two grouped bf16 GEMMs alone on rows already sorted by expert (no routing, no dequantization)."""
    counts = torch.bincount(ids.flatten(), minlength=gate_up.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    rows = x.repeat_interleave(ids.shape[1], dim=0)
    inter = down.shape[2]
    gu_t, dn_t = gate_up.transpose(1, 2), down.transpose(1, 2)

    def run():
        h = torch._grouped_mm(rows, gu_t, offs=offs)
        torch._grouped_mm(h[:, :inter].contiguous(), dn_t, offs=offs)

    return triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2-lite")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--sweep", nargs="*", default=[], help="weight formats whose tile choices to time")
    args = p.parse_args()
    experts, hidden, inter, k = SHAPES[args.shape]
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).bfloat16()
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).bfloat16()
    weights = {"bf16": (gate_up.cuda(), down.cuda())}
    for spec in ("q4", "q8"):
        quant = [quantize(w.float(), QuantSpec.parse(spec)) for w in (gate_up, down)]
        weights[spec] = tuple(type(w)(w.spec, w.shape, w.qweight.cuda(), w.scales.cuda()) for w in quant)
    print(f"{args.shape}: {experts} experts, hidden {hidden}, width {inter}, top-{k}; {torch.cuda.get_device_name()}")
    print(f"{'tokens':>7} {'kernel':<16} {'ms':>8} {'TFLOP/s':>8} {'of ceiling':>10}")
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, generator=gen).bfloat16().cuda()
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).cuda()
        topk = torch.rand(tokens, k, generator=gen).cuda()
        flops = 2 * tokens * k * 3 * inter * hidden
        ceiling = grouped_ceiling(x, *weights["bf16"], ids)
        rows = [("grouped bf16 GEMMs", ceiling)]
        for name, (gu, dn) in weights.items():
            rows.append((f"fused {name}", timed(lambda: fused_experts(x, gu, dn, ids, topk, dequantize_first=False))))
        for name, mib in (("q4", 256), ("q4", 128), ("q4", 64), ("q8", 256)):
            gu, dn = weights[name]
            call = functools.partial(fused_experts, x, gu, dn, ids, topk, dequantize_first=True,
                                     scratch_bytes=mib << 20)  # fmt: skip
            rows.append((f"{name} first {mib}M", timed(call)))
        rows.append(("dequant+grouped q4", timed(lambda: grouped_experts(x, *weights["q4"], ids, topk))))
        for name, ms in rows:
            print(f"{tokens:>7} {name:<18} {ms:>8.3f} {flops / ms / 1e9:>8.1f} {ceiling / ms:>9.0%}")
        if tokens == args.tokens[0]:
            for name in ("q4", "q8"):
                print(dequantize_rate(*weights[name]))
        for fmt in args.sweep:
            sweep(fmt, weights[fmt], x, ids, topk, ceiling)


def timed(call) -> float:
    """Median ms of a call (Triton's do_bench: warm, then timed with the L2 flushed between calls)."""
    return triton.testing.do_bench(call, warmup=30, rep=300, return_mode="median")


def dequantize_rate(gate_up, down) -> str:
    """The pass that dequantizes a layer's experts ahead of the bf16 kernels, alone: ms and GB/s (read + written)."""
    out = [torch.empty(w.shape, dtype=torch.bfloat16, device="cuda") for w in (gate_up, down)]
    ms = timed(lambda: [dequantize_into(w, o) for w, o in zip((gate_up, down), out)])
    moved = sum(w.qweight.nbytes + w.scales.nbytes + o.nbytes for w, o in zip((gate_up, down), out))
    return f"  dequantize {gate_up.spec.format} experts alone: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s read + written"


SWEEP = [(64, 32, 4, 4), (64, 64, 4, 4), (128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 8, 3),
         (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (256, 32, 8, 4), (256, 64, 8, 4),
         (128, 64, 8, 5), (256, 64, 4, 3), (128, 128, 4, 3)]  # fmt: skip


def sweep(fmt: str, weights, x, ids, topk, ceiling: float) -> None:
    """Each kernel's tile choices, the other kernel at its default; ms of the whole fused call."""
    gate_up, down = weights
    block_m = block_rows(ids.numel(), gate_up.shape[0])
    widths = {"gate_up": x.shape[1], "down": down.shape[2]}
    run = functools.partial(fused_experts, x, gate_up, down, ids, topk, dequantize_first=False)
    for kernel, k in widths.items():
        group = gate_up.spec.group_for(k) if fmt != "bf16" else k
        for tiles in SWEEP:
            if not tiles_valid(fmt, group, k, tiles[1]):
                continue
            try:
                ms = timed(lambda: run(tiles={kernel: tiles}))
            except Exception as exc:  # a tile the compiler or the chip refuses (shared memory)
                print(f"  sweep {fmt} {kernel} {tiles}: {type(exc).__name__}")
                continue
            print(f"  sweep {fmt} {kernel:<8} BM={block_m} {str(tiles):<18} {ms:8.3f} ms {ceiling / ms:6.0%}")


if __name__ == "__main__":
    main()
