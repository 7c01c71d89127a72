"""What a new prompt length costs the first time in cuDNN's fused attention: torch builds (and caches) a cuDNN plan
per shape, so the first prefill chunk of an unseen length pays it. Times the first and the second call of the
chunk's square causal attention and of one unmasked block of PAST_BLOCK past keys at MLA's widths (16 heads, q/k 192,
v 128, bf16), for query counts that are and are not multiples of 64 and 128.

    python bench/cudnn_shapes.py --queries 8192 8000 8100 8064 7936 4000 4096 30000
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from krasis.common.layers.attention import PAST_BLOCK, cudnn_attention  # noqa: E402


def timed_ms(call) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, nargs="+", default=[8192, 8000, 8100, 8064, 7936, 4000, 4096, 30000])
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args()
    cudnn_attention(*(torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16, device="cuda"),) * 3, 1.0, True)  # cuDNN up
    print(f"{'queries':>8} {'%64':>4} {'%128':>5} {'square first ms':>15} {'again':>7} {'past first ms':>13} {'again':>7}")
    for n in args.queries:
        q = torch.randn(1, args.heads, n, 192, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(1, args.heads, n, 128, dtype=torch.bfloat16, device="cuda")
        k_past = torch.randn(1, args.heads, PAST_BLOCK, 192, dtype=torch.bfloat16, device="cuda")
        v_past = torch.randn(1, args.heads, PAST_BLOCK, 128, dtype=torch.bfloat16, device="cuda")
        square = [timed_ms(lambda: cudnn_attention(q, q, v, 0.07, True)) for _ in range(2)]
        past = [timed_ms(lambda: cudnn_attention(q, k_past, v_past, 0.07, False)) for _ in range(2)]
        print(f"{n:>8} {n % 64:>4} {n % 128:>5} {square[0]:>15.1f} {square[1]:>7.1f} {past[0]:>13.1f} {past[1]:>7.1f}")


if __name__ == "__main__":
    main()
