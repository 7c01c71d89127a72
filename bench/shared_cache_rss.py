"""Host RAM of N worker processes serving one memory-mapped quantized cache, from /proc/<pid>/smaps_rollup.

PSS splits each shared page between the processes mapping it, so if the cache is one copy in RAM the
PSS of its mappings sums to about the cache pages touched once, not N times; the rest of each worker's
PSS is its own anonymous memory (torch runtime, KV cache, activations) plus shared libraries.
"""

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from krasis.bench.presets import preset_config
from krasis.bench.random_weights import checkpoint_shapes
from krasis.common.engine import EngineConfig, EngineCore
from krasis.common.model_loader import load_model
from krasis.common.quant.cache import HEADER_FILE, ensure_cache
from krasis.common.quant.plan import QuantPlan, group_of
from krasis.common.sampling_params import SamplingParams
from krasis.common.weights.checkpoint import INDEX_FILE
from krasis.common.weights.checkpoint_writer import save_sharded

MB, GB = 1e6, 1e9
COLUMNS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty",
           "cache_Rss", "cache_Pss", "VmHWM")
READY_TIMEOUT_S = 1800


def random_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # norms
    return torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(shape[-1] ** -0.5)  # O(1) activations


def write_checkpoint(model_dir: Path, layers: int) -> None:
    """Random bf16 weights, one shard per layer made and written before the next (peak RAM: ~2 layers).
    config.json is written last, so a directory holding it is complete and reused."""
    if (model_dir / "config.json").is_file():
        return
    shutil.rmtree(model_dir, ignore_errors=True)
    raw, groups = preset_config("deepseek-v2-lite", layers), {}
    for name, shape in checkpoint_shapes(raw).items():
        groups.setdefault(group_of(name), {})[name] = shape
    gen, weight_map, total = torch.Generator().manual_seed(0), {}, 0
    for i, group in enumerate(sorted(groups), start=1):
        tensors = {name: random_tensor(shape, gen) for name, shape in groups[group].items()}
        [staged] = save_sharded(tensors, model_dir / "staging")
        shard = staged.rename(model_dir / f"model-{i:05d}-of-{len(groups):05d}.safetensors")
        weight_map.update(dict.fromkeys(tensors, shard.name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (model_dir / "staging").rmdir()
    (model_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps(raw, indent=1))


def touch_pages(model, prompt_tokens: int = 8, new_tokens: int = 4) -> list[int]:
    """Prefill a short random prompt and decode a few tokens: maps in every kept weight and top-k experts."""
    vocab = model.config.vocab_size
    engine = EngineCore(model, EngineConfig(max_context=64, kv_pages=4), frozenset(), vocab)
    prompt = torch.randint(vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add("touch", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    events = []
    while engine.has_work:
        events += engine.step()
    return [e.token_id for e in events]


def worker(index: int, model_dir: str, quant: str, cache_root: str, ready, stop) -> None:
    """Load through the cache, run one short generation, report ready, then hold the mapping until told to stop."""
    torch.set_num_threads(1)  # N workers share the host's few cores
    try:
        model = load_model(model_dir, quant=QuantPlan.parse(quant, "bf16"), cache_root=cache_root)
        ready.put({"index": index, "pid": os.getpid(), "tokens": touch_pages(model)})
    except BaseException:
        ready.put({"index": index, "error": traceback.format_exc(limit=-3)})
        raise
    stop.wait()


def wait_ready(procs: list, ready) -> list[dict]:
    """Each worker's ready report, by index; raises if one fails or dies first."""
    reports, deadline = [], time.monotonic() + READY_TIMEOUT_S
    while len(reports) < len(procs):
        try:
            report = ready.get(timeout=2)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{dead[0].name} exited {dead[0].exitcode} before ready" if dead else "timed out")
            continue
        if "error" in report:
            raise RuntimeError(f"worker {report['index']} failed:\n{report['error']}")
        reports.append(report)
    return sorted(reports, key=lambda r: r["index"])


def stop_workers(procs: list, stop) -> None:
    stop.set()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def memory_of(pid: int, cache_dir: Path) -> dict[str, int]:
    """smaps_rollup fields, Rss/Pss of the cache file mappings alone, and peak RSS; in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    fields["cache_Rss"] = fields["cache_Pss"] = 0
    inside, prefix = False, f"{cache_dir}/"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        words = line.split(None, 5)  # a mapping line: range perms offset dev inode [path]
        if not words[0].endswith(":"):
            inside = len(words) == 6 and words[5].startswith(prefix)
        elif inside and words[0] in ("Rss:", "Pss:"):
            fields[f"cache_{words[0][:-1]}"] += int(words[1]) * 1024
    status = Path(f"/proc/{pid}/status").read_text()
    fields["VmHWM"] = int(status.split("VmHWM:")[1].split()[0]) * 1024
    return {key: fields[key] for key in COLUMNS}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def measure(args, model_dir: Path, cache_dir: Path) -> dict:
    """Start the workers, read their memory once all are ready, always end them."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, name=f"krasis::rss-worker-{i}", daemon=True,
                         args=(i, str(model_dir), args.quant, str(cache_dir.parent), ready, stop))
             for i in range(args.workers)]
    try:
        for proc in procs:
            proc.start()
        reports = wait_ready(procs, ready)
        rows = [{"pid": r["pid"], "tokens": r["tokens"], **memory_of(r["pid"], cache_dir)} for r in reports]
    finally:
        stop_workers(procs, stop)
    total = {key: sum(row[key] for row in rows) for key in COLUMNS}
    return {"workers": rows, "total": total}


def print_report(r: dict) -> None:
    print(f"{r['layers']} layers, {r['quant']}, {r['workers_n']} workers; "
          f"checkpoint {r['checkpoint_bytes'] / GB:.2f} GB bf16, cache {r['cache_bytes'] / GB:.2f} GB on disk "
          f"(built in {r['build']['seconds']:.0f} s, {r['build']['source_gb_per_s']:.2f} GB/s of source)")
    print(f"{'worker':>8}{'pid':>9}" + "".join(f"{c:>14}" for c in COLUMNS) + "   (MB)")
    for i, row in enumerate(r["workers"]):
        print(f"{i:>8}{row['pid']:>9}" + "".join(f"{row[c] / MB:>14.0f}" for c in COLUMNS))
    print(f"{'total':>8}{'':>9}" + "".join(f"{r['total'][c] / MB:>14.0f}" for c in COLUMNS))
    t, cache = r["total"], r["cache_bytes"]
    print(f"cache PSS total / cache bytes: {t['cache_Pss'] / cache:.2f} "
          f"(N private copies of the touched pages would be {t['cache_Rss'] / cache:.2f})")
    print(f"file-backed PSS total / cache bytes: {t['Pss_File'] / cache:.2f} (includes shared libraries)")
    print(f"sum of PSS {t['Pss'] / GB:.2f} GB = cache {t['cache_Pss'] / GB:.2f} + anonymous {t['Pss_Anon'] / GB:.2f} "
          f"+ other files {(t['Pss_File'] - t['cache_Pss']) / GB:.2f}; sum of RSS {t['Rss'] / GB:.2f} GB")
    print(f"verdict: {'one copy' if r['one_copy'] else 'NOT one copy'}: cache pages are counted "
          f"{t['cache_Rss'] / max(t['cache_Pss'], 1):.2f} times in RSS and once in PSS across {r['workers_n']} workers")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quant", default="q4", help="format of the routed and shared experts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "krasis-shared-cache-rss",
                        help="checkpoint and cache go here; an existing checkpoint is reused")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model_dir = args.workdir / f"deepseek-v2-lite-{args.layers}l"
    print(f"writing {model_dir} (skipped if present)...", file=sys.stderr, flush=True)
    write_checkpoint(model_dir, args.layers)
    cache_dir = ensure_cache(model_dir, QuantPlan.parse(args.quant, "bf16"), cache_root=args.workdir / "cache")
    print(f"starting {args.workers} workers...", file=sys.stderr, flush=True)
    result = {"layers": args.layers, "quant": args.quant, "workers_n": args.workers,
              "checkpoint_bytes": dir_bytes(model_dir), "cache_bytes": dir_bytes(cache_dir),
              "build": json.loads((cache_dir / HEADER_FILE).read_text())["build"],
              **measure(args, model_dir, cache_dir)}
    # Every worker runs the same prompt, so touches the same pages: one copy means the cache's PSS summed
    # over workers is what one worker has resident, where N private copies would be N times that.
    touched = max(row["cache_Rss"] for row in result["workers"])
    result["one_copy"] = result["total"]["cache_Pss"] <= 1.02 * touched
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
