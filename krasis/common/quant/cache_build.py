"""Building the quantized weight cache: the checkpoint transcoded layer group by layer group, in
parallel across cores, each file written atomically and hashed, the header last (see cache.py)."""

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from krasis.common.model_config import read_hf_config
from krasis.common.models import model_class
from krasis.common.quant.cache import (
    CACHE_FORMAT_VERSION,
    CHUNK_BYTES,
    DATA_ALIGNMENT,
    HEADER_FILE,
    WRITES_IN_FLIGHT,
    CacheError,
    _DTYPE_NAMES,
    _json_sha256,
    _workers,
    _write_json_atomic,
)
from krasis.common.quant.formats import QuantSpec, quantize, storage_shapes
from krasis.common.quant.fp8 import DequantizingReader
from krasis.common.quant.plan import CacheItem, QuantPlan, group_of, plan_items, spec_text
from krasis.common.weights.checkpoint import CheckpointReader


def build_cache(model_dir: Path, plan: QuantPlan, path: Path, source: dict, progress: bool, checkpoint=None) -> dict:
    """Transcode the checkpoint into `path` layer group by layer group, header last. -> header
    Peak RAM: the output of WRITES_IN_FLIGHT + 1 groups plus one CHUNK_BYTES job per core.
    `checkpoint`: the tensors, if not the directory's safetensors: any reader with DequantizingReader's
    model_dir, names, shape, source_nbytes and fetch (the benchmark's random weights)."""
    started = time.perf_counter()
    if checkpoint is None:
        config = read_hf_config(model_dir)
        # tensors under the model's names, those it does not use (a vision tower) left out
        rename = model_class(config["model_type"]).checkpoint_name
        checkpoint = DequantizingReader(CheckpointReader(model_dir), config, rename)
    groups = _plan_groups(checkpoint, plan)  # every shape checked against its format before any work
    shutil.rmtree(path, ignore_errors=True)  # only ever an invalid cache or a partial build
    path.mkdir(parents=True)
    header = {"format_version": CACHE_FORMAT_VERSION, "plan": plan.to_json(), "source": source}
    try:
        _transcode(checkpoint, plan, groups, path, header, progress)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    source_bytes = sum(checkpoint.source_nbytes(n) for n in checkpoint.names)
    cache_bytes = sum(f["size"] for f in header["files"])
    header["build"] = {"seconds": round(seconds, 3), "source_bytes": source_bytes, "cache_bytes": cache_bytes,
                       "source_gb_per_s": round(source_bytes / seconds / 1e9, 3), "workers": _workers(),
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_header(path, header)
    if progress:
        print(f"krasis: built {path} ({cache_bytes / 1e9:.2f} GB) from {source_bytes / 1e9:.2f} GB of checkpoint "
              f"in {seconds:.1f} s: {source_bytes / seconds / 1e9:.2f} GB/s", file=sys.stderr)
    return header


def _plan_groups(checkpoint: DequantizingReader, plan: QuantPlan) -> dict[str, list[CacheItem]]:
    """Cache file stem -> its items, "other" first, then layers in order."""
    names: dict[str, list[str]] = {}
    for name in checkpoint.names:
        names.setdefault(group_of(name), []).append(name)
    groups = {g: plan_items(names[g], checkpoint.shape) for g in sorted(names, key=lambda g: (g != "other", g))}
    for item in (item for items in groups.values() for item in items):
        spec = plan.spec_for(item.name, item.shape)
        if spec is not None:
            try:
                storage_shapes(spec, item.shape)
            except ValueError as exc:
                raise CacheError(f"{item.name}: {exc}") from None
    return groups


def _transcode(checkpoint: DequantizingReader, plan: QuantPlan, groups: dict, path: Path, header: dict, progress: bool) -> None:
    """Write one safetensors file per group; fills the header's files, tensors and quantized maps."""
    header["files"], header["tensors"], header["quantized"] = [], {}, {}
    total = sum(checkpoint.source_nbytes(n) for n in checkpoint.names)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"quantizing {checkpoint.model_dir.name}",
               disable=not progress, file=sys.stderr)
    writers = ThreadPoolExecutor(WRITES_IN_FLIGHT)
    with bar, _single_threaded_ops(), ThreadPoolExecutor(_workers()) as pool, writers:
        pending = []  # groups written (hashed, fsynced) while the next is transcoded
        for group, items in groups.items():
            tensors, quantized = _transcode_group(checkpoint, plan, items, pool, bar)
            header["tensors"].update(dict.fromkeys(tensors, f"{group}.safetensors"))
            header["quantized"].update(quantized)
            if len(pending) == WRITES_IN_FLIGHT:  # bounds RAM at a few groups of output
                header["files"].append(pending.pop(0).result())
            pending.append(writers.submit(_write_safetensors, path / f"{group}.safetensors", tensors))
        header["files"] += [f.result() for f in pending]


def _transcode_group(checkpoint: DequantizingReader, plan: QuantPlan, items: list[CacheItem], pool, bar):
    """-> the group's cache tensors (each as its parts along dim 0), and {name: spec, shape, tensors}
    of its quantized weights."""
    tensors, quantized = {}, {}
    for item, spec, futures in [_submit_item(checkpoint, plan, item, pool, bar) for item in items]:
        parts = [f.result() for f in futures]
        tensors.update({key: [p[key] for p in parts] for key in parts[0]})
        if spec is not None:
            quantized[item.name] = {"spec": spec_text(spec), "shape": list(item.shape), "tensors": sorted(parts[0])}
    return tensors, quantized


def _submit_item(checkpoint: DequantizingReader, plan: QuantPlan, item: CacheItem, pool, bar):
    """Queue an item's transcoding in parts of about CHUNK_BYTES of source along dim 0 (experts, or a
    matrix's rows): every format stores dim-0 slices independently (formats.py layout)."""
    spec = plan.spec_for(item.name, item.shape)
    plain = None if item.stacked else checkpoint.fetch(item.sources[0][0])
    splittable = item.stacked or (spec is not None and plain.scale_inv is None)  # an FP8 scale spans 128 rows
    slices = item.shape[0] if splittable else 1
    item_bytes = sum(checkpoint.source_nbytes(n) for parts in item.sources for n in parts)
    step = max(1, CHUNK_BYTES * slices // max(item_bytes, 1))
    futures = []
    for begin in range(0, slices, step):
        rows = slice(begin, min(begin + step, slices)) if splittable else slice(None)
        # fetched on this thread (the checkpoint reader is not thread-safe); workers read the views
        fetched = [[checkpoint.fetch(n) for n in parts] for parts in item.sources[rows]] if item.stacked else plain
        future = pool.submit(_transcode_chunk, item, rows, fetched, spec)
        future.add_done_callback(lambda _, n=item_bytes * min(step, slices - begin) // slices: bar.update(n))
        futures.append(future)
    return item, spec, futures


def _transcode_chunk(item: CacheItem, rows: slice, fetched, spec: QuantSpec | None) -> dict:
    """Rows (experts) of one cache tensor -> its stored tensors, quantized or kept."""
    if item.stacked:
        weight = torch.stack([torch.cat([s.load() for s in parts]) for parts in fetched])
        dtype = fetched[0][0].model_dtype
    else:
        weight, dtype = fetched.load()[rows], fetched.model_dtype
    if spec is None:
        return {item.name: weight.to(dtype)}
    try:
        return quantize(weight, spec).tensors(item.name)
    except ValueError as exc:  # e.g. inf or nan in the checkpoint
        raise CacheError(f"{item.name}: {exc}") from None


@contextlib.contextmanager
def _single_threaded_ops():
    """Pool workers started inside run torch ops on one core each: many small jobs at once beat
    each op spread over every core (2x on 16 cores, measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_safetensors(path: Path, tensors: dict[str, list[torch.Tensor]]) -> dict:
    """Write one safetensors file atomically (temp + rename), hashing it as it goes; each tensor is
    given as parts along dim 0, written one after another. -> file record"""
    # Widest dtypes first keeps every tensor aligned to its element size with no gaps.
    order = sorted(tensors, key=lambda n: (-tensors[n][0].element_size(), n))
    entries, offset = {}, 0
    for name in order:
        parts = tensors[name]
        shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]] if parts[0].dim() else []
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        entries[name] = {"dtype": _DTYPE_NAMES[parts[0].dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % DATA_ALIGNMENT)
    digest, temp = hashlib.sha256(), path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as f:
        for chunk in [struct.pack("<Q", len(text)), text, *(_raw_bytes(p) for n in order for p in tensors[n])]:
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    return {"name": path.name, "size": 8 + len(text) + offset, "sha256": digest.hexdigest()}


def _raw_bytes(tensor: torch.Tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_header(path: Path, header: dict) -> None:
    header["header_sha256"] = _json_sha256(header)
    _write_json_atomic(path / HEADER_FILE, header)
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames are durable before anyone trusts the header
    finally:
        os.close(directory)
