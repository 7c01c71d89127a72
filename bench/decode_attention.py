"""Decode attention on the CPU: `decode_ops.decode_attention` against the torch GEMMs that attention.py runs above
DECODE_KERNEL_CONTEXT (`attend_few_queries`, one sequence at a time), at contexts of bf16 KV cached in a ring of
layers larger than the L3 (as a decode step finds them), next to the read bandwidth measured in the same run.

Per case: ms per layer (median), GB/s of KV read (MLA reads each latent row once: its values are a prefix of its
keys), and the largest difference from the torch path relative to its largest output. `--against REV` also times
that git revision's kernel (built from its decode_ops.cpp), for a before/after on one machine.

    python bench/decode_attention.py --threads 16 --against HEAD
"""

import argparse
import hashlib
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from krasis.bench.limits import read_bandwidth
from krasis.common.kernels.cpu import decode_ops
from krasis.common.kernels.cpu.build import cpu_tag, load_extension
from krasis.common.layers.attention import attend_few_queries

GB = 1e9
RING_BYTES = 768 << 20  # caches cycled through: far past any L3, so each call reads its KV from memory
SOURCES = "krasis/common/kernels/cpu"
# name: (query heads, KV heads, key width, value width); MLA's values are the first 512 columns of its latent rows
SHAPES = {"mla": (16, 1, 576, 512), "gqa": (32, 4, 128, 128)}  # DeepSeek-V2-Lite absorbed; Qwen3-30B-A3B


def cache_views(shape: str, rows: int, gen: torch.Generator):
    """A bf16 cache layer and its (k [rows, Hkv, D], v [rows, Hkv, Dv]) views, laid out as the layers lay it."""
    _, kv_heads, dim, v_dim = SHAPES[shape]
    if kv_heads == 1 and v_dim < dim:
        cache = torch.randn(rows, dim, generator=gen).bfloat16()
        return cache[:, None, :], cache[:, None, :v_dim]
    cache = torch.randn(rows, kv_heads, dim + v_dim, generator=gen).bfloat16()
    return cache[..., :dim], cache[..., dim:]


def kv_bytes(shape: str, rows: int) -> int:
    _, kv_heads, dim, v_dim = SHAPES[shape]
    return rows * kv_heads * 2 * (dim if kv_heads == 1 and v_dim < dim else dim + v_dim)


def torch_path(q, k, v, starts, ends, scale, slots):
    """What attention.py does for long contexts: two GEMMs per sequence over its rows (gathered when paged)."""
    outs = []
    for b, (start, end) in enumerate(zip(starts, ends)):
        kb, vb = (k[start:end], v[start:end]) if slots is None else (k[slots[start:end]], v[slots[start:end]])
        outs.append(attend_few_queries(q[b : b + 1], kb, vb, scale, None))
    return torch.cat(outs)


def kernel_at(rev: str):
    """decode_attention of the decode_ops.cpp (and its headers) committed at `rev`, or kept in the directory `rev` (a
    machine given the tree without its history), built under a name of its own."""
    repo = Path(__file__).resolve().parent.parent
    target = Path(tempfile.mkdtemp())
    for name in ("decode_ops.cpp", "amx_tiles.h"):
        if Path(rev).is_dir():
            if (Path(rev) / name).exists():
                shutil.copy(Path(rev) / name, target / name)
            continue
        shown = subprocess.run(["git", "show", f"{rev}:{SOURCES}/{name}"], cwd=repo, capture_output=True)
        if shown.returncode == 0:
            (target / name).write_bytes(shown.stdout)
    tag = hashlib.sha1(b"".join(path.read_bytes() for path in sorted(target.iterdir()))).hexdigest()[:8]
    flags = ["-O3", "-march=native", "-ffp-contract=off"]
    return with_slots(load_extension(f"krasis_decode_{cpu_tag()}_at_{tag}", target / "decode_ops.cpp", flags))


def kernel_with(defines: str):
    """decode_attention of the working tree's decode_ops.cpp built with these macros (`A=1,B=0`)."""
    return with_slots(decode_ops.build_extension(tuple(defines.split(","))))


def with_slots(ops):
    empty = torch.empty(0, dtype=torch.long)
    return lambda q, k, v, starts, ends, scale, slots: ops.decode_attention(
        q, k, v, empty if slots is None else slots, starts, ends, scale)  # fmt: skip


def case_inputs(shape: str, context: int, batch: int, paged: bool, ring_bytes: int, gen: torch.Generator):
    """(q, layers [(k, v)], starts, ends, slots): `batch` sequences of `context` rows each, in layers cycled through."""
    heads, _, dim, _ = SHAPES[shape]
    rows = context * batch
    layers = [cache_views(shape, rows, gen) for _ in range(max(1, min(256, ring_bytes // kv_bytes(shape, rows))))]
    q = torch.randn(batch, heads, dim, generator=gen).bfloat16()
    starts, ends = [b * context for b in range(batch)], [(b + 1) * context for b in range(batch)]
    slots = None
    if paged:  # pages of 16 rows in a shuffled order, as a long-lived pool hands them out
        slots = (torch.randperm(rows // 16, generator=gen)[:, None] * 16 + torch.arange(16)).flatten()
    return q, layers, starts, ends, slots


def time_layers(fn, q, layers, starts, ends, scale, slots, min_seconds: float) -> float:
    """Median seconds of one call, each call on the next layer of the ring."""
    fn(q, *layers[0], starts, ends, scale, slots)  # warm-up: build, thread pool
    times, spent, i = [], 0.0, 0
    while spent < min_seconds or len(times) < 5:
        k, v = layers[i % len(layers)]
        start = time.perf_counter()
        fn(q, k, v, starts, ends, scale, slots)
        times.append(time.perf_counter() - start)
        spent, i = spent + times[-1], i + 1
    return statistics.median(times)


def run_case(paths: dict, shape: str, context: int, batch: int, args) -> dict:
    gen = torch.Generator().manual_seed(context + batch)
    q, layers, starts, ends, slots = case_inputs(shape, context, batch, args.paged, args.ring_mib << 20, gen)
    scale = SHAPES[shape][2] ** -0.5
    expected = torch_path(q, *layers[0], starts, ends, scale, slots).double()
    row = {"shape": shape, "context": context, "batch": batch, "bytes": kv_bytes(shape, context * batch)}
    for name, fn in paths.items():
        out = fn(q, *layers[0], starts, ends, scale, slots)
        row[f"{name}_diff"] = ((out.double() - expected).abs().max() / expected.abs().max()).item()
        row[name] = time_layers(fn, q, layers, starts, ends, scale, slots, args.min_seconds)
    return row


def print_row(row: dict, names: list[str]):
    cells = [f"{row['shape']:>4} {row['context']:>6} x{row['batch']:<3}"]
    for name in names:
        rate = row["bytes"] / row[name] / GB
        cells.append(f"{name} {row[name] * 1e3:8.3f} ms {rate:6.1f} GB/s (diff {row[f'{name}_diff']:.1e})")
    print("  ".join(cells), flush=True)


def print_table(table: list[dict], names: list[str]):
    """ms per layer and GB/s of KV read per path, against the read bandwidth of the same thread count."""
    heads = " ".join(f"{name + ' ms':>12} {'GB/s':>6}" for name in names)
    print(f"\n{'thr':>3} {'shape':>5} {'ctx':>6} {'B':>3} {'read GB/s':>9} {heads}")
    for row in table:
        cells = " ".join(f"{row[n] * 1e3:12.3f} {row['bytes'] / row[n] / GB:6.1f}" for n in names)
        case = f"{row['threads']:>3} {row['shape']:>5} {row['context']:>6} {row['batch']:>3}"
        print(f"{case} {row['bandwidth']:9.1f} {cells}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=HEADS,KV_HEADS,DIM,V_DIM",
                        help="a shape of one's own (a single KV head with V_DIM < DIM: values within the keys)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="sequences a call (16: up to 4K)")
    parser.add_argument("--paged", action="store_true", help="rows through shuffled slots (pages of 16)")
    parser.add_argument("--against", help="also time the kernel of this git revision (e.g. HEAD), or of the sources "
                        "in this directory")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=MACROS",
                        help="also time the working tree's kernel built with these macros (A=1,B=0)")
    parser.add_argument("--ring-mib", type=int, default=RING_BYTES >> 20,
                        help="KV layers cycled through (at least one); below the L3, calls read cached KV")
    parser.add_argument("--kernels-only", action="store_true", help="time no torch path (it still checks the outputs)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed calls per case at least this long")
    return parser.parse_args()


def main():
    args = parse_args()
    for shape in args.shape:
        name, dims = shape.split("=")
        SHAPES[name] = tuple(int(d) for d in dims.split(","))
    paths = {"kernel": decode_ops.decode_attention}
    if args.against:
        paths[args.against] = kernel_at(args.against)
    for variant in args.variant:
        name, defines = variant.split("=", 1)
        paths[name] = kernel_with(defines)
    if not args.kernels_only:
        paths["torch"] = torch_path
    table = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        best, median = read_bandwidth(gib=1.0)
        print(f"threads {threads}: read bandwidth {best:.1f} GB/s (median {median:.1f})", flush=True)
        for shape in args.shapes:
            for context in args.contexts:
                for batch in args.batches:
                    if batch > 1 and context > 4096:
                        continue  # many long sequences: a ring of them would not fit the memory of small boxes
                    row = run_case(paths, shape, context, batch, args)
                    row.update(threads=threads, bandwidth=best)
                    print_row(row, list(paths))
                    table.append(row)
    print_table(table, list(paths))


if __name__ == "__main__":
    main()
