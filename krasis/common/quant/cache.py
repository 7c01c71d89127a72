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
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from krasis.common.env import quant_cache_root
from krasis.common.model_config import read_hf_config
from krasis.common.quant.formats import QuantizedWeight, QuantSpec
from krasis.common.quant.plan import QuantPlan
from krasis.common.weights.checkpoint import (
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    CheckpointError,
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


def ensure_cache(
    model_dir: str | Path, plan: QuantPlan, cache_root: str | Path | None = None, progress: bool = True, checkpoint=None
) -> Path:
    """The cache directory of `model_dir` under `plan`, built first if it is missing or invalid.
    Concurrent callers (any process) build it once: the others wait for the build, then reuse it.
    `checkpoint`: a reader to build from instead of the directory's safetensors (see build_cache)."""
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
        from krasis.common.quant.cache_build import build_cache  # only a building process needs it

        build_cache(model_dir, plan, path, source, progress, checkpoint)
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


def _workers() -> int:
    return len(os.sched_getaffinity(0))


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
