"""The quantized weight cache: built once per (checkpoint, plan) by transcoding the checkpoint layer
by layer, then memory-mapped read-only by every process on the host (one copy, in the page cache).

<root>/<model>-<plan tag>-<source hash>/
  other.safetensors, model.layers.000.safetensors, ...  one safetensors file per decoder layer
  krasis-cache.json      header, written last: version, plan, source fingerprint, files (size, sha256)
  krasis-cache.verified  each file's (size, mtime, ctime, inode) when its sha256 last matched

Every open checks the header's own checksum, every file's size and safetensors header. A file's
contents are re-hashed when its stat differs from the verified marker (the first open after the
build, or anything wrote to it since) or on request (verify=True): a full check at every start
would read the whole cache (tens of GB) before serving.
"""

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from krasis.common.env import quant_cache_root
from krasis.common.model_config import read_hf_config
from krasis.common.quant.formats import QuantizedWeight, QuantSpec, quantize, storage_shapes
from krasis.common.quant.fp8 import DequantizingReader
from krasis.common.quant.plan import CacheItem, QuantPlan, group_of, plan_items, spec_text
from krasis.common.weights.checkpoint import (
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    CheckpointError,
    CheckpointReader,
    read_header,
)

CACHE_FORMAT_VERSION = 1
HEADER_FILE = "krasis-cache.json"
VERIFIED_FILE = "krasis-cache.verified"
DATA_ALIGNMENT = 4096  # tensor data starts page-aligned, ready for host-memory registration
WRITES_IN_FLIGHT = 2  # one file's fsync overlaps the next one's write
CHUNK_BYTES = 4 << 20  # source bytes per transcoding job: fits the caches, spreads a layer over cores
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CacheError(ValueError):
    """A cache that must not be used (missing, stale, truncated, corrupt); one line naming it."""


def ensure_cache(model_dir: str | Path, plan: QuantPlan, cache_root: str | Path | None = None, progress: bool = True) -> Path:
    """The cache directory of `model_dir` under `plan`, built first if it is missing or invalid.
    Concurrent callers (any process) build it once: the others wait for the build, then reuse it."""
    model_dir = Path(model_dir).resolve()
    read_hf_config(model_dir)  # a clear error for a directory that is no model
    source = source_fingerprint(model_dir)
    root = Path(cache_root).expanduser() if cache_root else quant_cache_root()
    path = root / f"{_model_name(model_dir)}-{plan.tag}-{source['hash'][:12]}"
    if _reusable(path, model_dir, report=False):
        return path
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f"{path.name}.lock", progress):
        if _reusable(path, model_dir, report=progress):
            return path
        build_cache(model_dir, plan, path, source, progress)
        validate_cache(path, model_dir, verify=True)
        _remove_stale(root, path, model_dir, plan)
    return path


def _model_name(model_dir: Path) -> str:
    """The directory's name; for a Hugging Face hub snapshot (models--org--name/snapshots/<commit>), org--name."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent.name.removeprefix("models--")
    return model_dir.name


def open_cache(path: str | Path, model_dir: str | Path | None = None, verify: bool | None = None) -> "CacheReader":
    """Validate (see the module doc; with `model_dir`, also that its source is unchanged) and map."""
    path = Path(path)
    return CacheReader(path, validate_cache(path, model_dir, verify))


def source_fingerprint(model_dir: Path) -> dict:
    """config.json's sha256 and each checkpoint file's (name, size, mtime_ns); hashing the contents
    would read the whole checkpoint at every start."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == INDEX_FILE)
    stats = [[p.name, st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]]
    config_sha256 = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    digest = _json_sha256({"version": CACHE_FORMAT_VERSION, "config_sha256": config_sha256, "files": stats})
    return {"path": str(model_dir), "hash": digest, "config_sha256": config_sha256, "files": stats}


def _json_sha256(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _reusable(path: Path, model_dir: Path, report: bool) -> bool:
    if not path.is_dir():
        return False
    try:
        validate_cache(path, model_dir)
        return True
    except (CacheError, OSError) as exc:  # OSError: files vanishing under a concurrent rebuild
        if report:
            print(f"krasis: rebuilding the quantized cache: {exc}", file=sys.stderr)
        return False


@contextlib.contextmanager
def _build_lock(lock_path: Path, progress: bool):
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"krasis: waiting for another process to build {lock_path.stem}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def _remove_stale(root: Path, keep: Path, model_dir: Path, plan: QuantPlan) -> None:
    """Caches of the same checkpoint directory and plan, built from older contents of it."""
    for other in root.iterdir():
        if other == keep or not other.is_dir() or not other.name.startswith(f"{_model_name(model_dir)}-{plan.tag}-"):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if json.loads((other / HEADER_FILE).read_text())["source"]["path"] == str(model_dir):
                shutil.rmtree(other)  # processes still mapping its files keep their pages


# Building


def build_cache(model_dir: Path, plan: QuantPlan, path: Path, source: dict, progress: bool) -> dict:
    """Transcode the checkpoint into `path` layer group by layer group, header last. -> header
    Peak RAM: the output of WRITES_IN_FLIGHT + 1 groups plus one CHUNK_BYTES job per core."""
    started = time.perf_counter()
    checkpoint = DequantizingReader(CheckpointReader(model_dir), read_hf_config(model_dir))
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
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"quantizing {checkpoint.reader.model_dir.name}",
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


def _workers() -> int:
    return len(os.sched_getaffinity(0))


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


def _write_json_atomic(file: Path, data: dict) -> None:
    temp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temp, file)


# Validation


def validate_cache(path: Path, model_dir: str | Path | None = None, verify: bool | None = None) -> dict:
    """The cache's header, after the checks in the module doc. verify: True re-hashes every file,
    False none, None those changed since last verified."""
    header = _read_cache_header(path)
    if model_dir is not None:
        source = source_fingerprint(Path(model_dir).resolve())
        if source["hash"] != header["source"]["hash"]:
            raise CacheError(f"{path}: stale: {model_dir} changed since the cache was built from it")
    for record in header["files"]:
        size = (path / record["name"]).stat().st_size if (path / record["name"]).is_file() else None
        if size != record["size"]:
            found = "missing" if size is None else f"{size} bytes"
            raise CacheError(f"{path}: {record['name']} is {found}, the header says {record['size']} (truncated or modified)")
    if verify is not False:
        _verify_checksums(path, header, everything=bool(verify))
    return header


def _read_cache_header(path: Path) -> dict:
    try:
        header = json.loads((path / HEADER_FILE).read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: no {HEADER_FILE}: not a cache, or its build did not finish") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable {HEADER_FILE}: {exc}") from None
    if not isinstance(header, dict) or header.get("format_version") != CACHE_FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise CacheError(f"{path}: cache format version {version!r}, this krasis reads {CACHE_FORMAT_VERSION}")
    recorded = header.pop("header_sha256", None)
    if recorded != _json_sha256(header):
        raise CacheError(f"{path}: {HEADER_FILE} fails its checksum (corrupt or edited)")
    header["header_sha256"] = recorded
    return header


def _file_stat(file: Path) -> list[int]:
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # ctime moves on any write, even if mtime is reset


def _verify_checksums(path: Path, header: dict, everything: bool) -> None:
    marker = {}
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((path / VERIFIED_FILE).read_text())
    verified = marker.get("files", {}) if marker.get("header_sha256") == header["header_sha256"] else {}
    records = [r for r in header["files"] if everything or verified.get(r["name"]) != _file_stat(path / r["name"])]
    if not records:
        return
    stats = {r["name"]: _file_stat(path / r["name"]) for r in header["files"]}
    with ThreadPoolExecutor(min(len(records), _workers())) as pool:
        digests = list(pool.map(lambda r: _sha256_file(path / r["name"]), records))
    for record, digest in zip(records, digests):
        if digest != record["sha256"]:
            raise CacheError(f"{path}: {record['name']} fails its sha256 checksum (corrupt)")
    with contextlib.suppress(OSError):  # a read-only cache is re-hashed at each open instead
        _write_json_atomic(path / VERIFIED_FILE, {"header_sha256": header["header_sha256"], "files": stats})


def _sha256_file(file: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(16 << 20)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


class CacheReader:
    """A validated cache, memory-mapped read-only: every process maps the same page-cache pages.
    Its tensors are views of the mapping; writing to one faults."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.plan = QuantPlan.from_json(header["plan"])
        self._tensors = {}  # name -> (mapping, entry, data start)
        for record in header["files"]:
            self._map_file(path / record["name"])
        if set(self._tensors) != set(header["tensors"]):
            raise CacheError(f"{path}: its files and {HEADER_FILE} disagree on the tensors they hold")

    def _map_file(self, file: Path) -> None:
        try:
            entries = read_header(file)
        except CheckpointError as exc:
            raise CacheError(str(exc)) from None
        data_start = file.stat().st_size - max((e.data_offsets[1] for e in entries.values()), default=0)
        with open(file, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._tensors.update({name: (mapping, entry, data_start) for name, entry in entries.items()})

    @property
    def names(self) -> list[str]:
        """Every stored tensor: kept weights under their checkpoint names, quantized ones' parts."""
        return list(self._tensors)

    @property
    def quantized_names(self) -> list[str]:
        return list(self.header["quantized"])

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self.header["quantized"]

    def get(self, name: str) -> torch.Tensor:
        """A stored tensor, as a read-only view of the mapped file."""
        if name not in self._tensors:
            raise CacheError(f"{self.path}: no tensor named {name!r}")
        mapping, entry, data_start = self._tensors[name]
        begin, end = entry.data_offsets
        if begin == end:
            return torch.empty(entry.shape, dtype=entry.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": intended
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        return raw.view(entry.dtype).reshape(entry.shape)

    def quantized(self, name: str) -> QuantizedWeight:
        """A quantized weight by its model parameter name (e.g. `model.layers.3.mlp.experts.down_proj`)."""
        info = self.header["quantized"].get(name)
        if info is None:
            raise CacheError(f"{self.path}: {name!r} is not a quantized weight of this cache")
        tensors = {key: self.get(key) for key in info["tensors"]}
        return QuantizedWeight.from_tensors(name, tensors, QuantSpec.parse(info["spec"]), tuple(info["shape"]))
