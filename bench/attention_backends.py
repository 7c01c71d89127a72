"""Prefill attention at MLA shapes (DeepSeek-V2-Lite: 16 heads, q/k 192 wide, v 128) through each SDPA backend
that can run it, timed and checked against the memory-efficient kernel the prefill uses today:

- efficient: lower-right causal bias (what `attention.attend` passes for a chunk over a longer context);
- flash: v padded to 192 (flash takes one head width), is_causal (upper-left: right only for a square);
- cudnn: is_causal, q/k 192 and v 128 as they are (upper-left: right only for a square);
- split: `attention.attend_chunk_cudnn`, cuDNN over the past keys and over the chunk's own, merged by log-sum-exp.

    python bench/attention_backends.py --shapes 8192:8192 4096:32768 32768:32768
"""

import argparse

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from krasis.common.layers.attention import attend_chunk_cudnn

HEADS, QK, V = 16, 192, 128


def causal_flops(queries: int, context: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over the causal (lower-right) triangle."""
    seen = queries * (context - queries) + queries * (queries + 1) / 2
    return 2 * HEADS * seen * (QK + V)


def run(backend: str, q, k, v):
    queries, context = q.shape[2], k.shape[2]
    if backend == "efficient":
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(queries, context))
    if backend == "flash":
        padded = F.pad(v, (0, QK - V))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, padded, is_causal=True)[..., :V]
    if backend == "split":
        return attend_chunk_cudnn(q, k, v, QK**-0.5) if queries < context else run("cudnn", q, k, v)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["8192:8192", "4096:32768", "8192:32768", "32768:32768"])
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    print(f"{'queries':>8} {'context':>8} {'backend':<10} {'ms':>8} {'TFLOP/s':>8} {'max |diff|':>10}")
    for shape in args.shapes:
        queries, context = map(int, shape.split(":"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, HEADS, queries, QK, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, HEADS, context, QK, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, HEADS, context, V, device="cuda", dtype=torch.bfloat16, generator=gen)
        reference = run("efficient", q, k, v)
        for backend in ("efficient", "flash", "cudnn", "split"):
            try:
                diff = (run(backend, q, k, v).float() - reference.float()).abs().max().item()
                ms = triton.testing.do_bench(lambda: run(backend, q, k, v), warmup=5, rep=50, return_mode="median")
            except Exception as exc:  # a backend that refuses the shape
                print(f"{queries:>8} {context:>8} {backend:<10} refused: {str(exc).splitlines()[0][:120]}")
                continue
            print(f"{queries:>8} {context:>8} {backend:<10} {ms:>8.2f} {causal_flops(queries, context) / ms / 1e9:>8.0f} "
                  f"{diff:>10.4f}")


if __name__ == "__main__":
    main()
