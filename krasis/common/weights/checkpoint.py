"""Reads a Hugging Face safetensors checkpoint tensor by tensor, after validating every header.

Headers are parsed here (8-byte little-endian length + JSON) so that a bad file fails with one
clear line naming it, never with a traceback from inside safetensors.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}

_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the one-line message names the file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # [begin, end) within the data section


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Validated header entries of one safetensors file, in the order their data is stored."""
    header, data_bytes = _read_raw_header(path)
    _check_metadata(path, header.pop("__metadata__", {}))
    entries = {name: _parse_entry(path, name, spec) for name, spec in header.items()}
    ordered = dict(sorted(entries.items(), key=lambda item: item[1].data_offsets))
    _check_data_layout(path, ordered, data_bytes)
    return ordered


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt safetensors header ({detail})")


def _read_raw_header(path: Path) -> tuple[dict, int]:
    """The header's JSON object and the size of the data section that follows it."""
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_HEADER_LEN_BYTES)
        if len(prefix) < _HEADER_LEN_BYTES:
            raise _corrupt(path, f"file is {file_bytes} bytes, too short for the header length")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > min(_MAX_HEADER_BYTES, file_bytes - _HEADER_LEN_BYTES):
            raise _corrupt(path, f"header length {header_bytes} exceeds the {file_bytes}-byte file")
        text = f.read(header_bytes)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"invalid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "JSON is not an object")
    return header, file_bytes - _HEADER_LEN_BYTES - header_bytes


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ is not a map of strings")


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # type() excludes bool


def _parse_entry(path: Path, name: str, spec: object) -> TensorEntry:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise _corrupt(path, f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype_name, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        supported = ", ".join(SAFETENSORS_DTYPES)
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r} (supported: {supported})"
        )
    begin, end = offsets
    expected = prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _corrupt(
            path, f"tensor {name!r} spans {end - begin} bytes, its shape {shape} needs {expected}"
        )
    return TensorEntry(path, dtype, tuple(shape), (begin, end))


def _check_data_layout(path: Path, entries: dict[str, TensorEntry], data_bytes: int) -> None:
    """Tensors must tile the data section exactly, as safetensors itself requires."""
    needed = max((e.data_offsets[1] for e in entries.values()), default=0)
    if needed > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: header says {needed} bytes of data, file has {data_bytes}"
        )
    position = 0
    for name, entry in entries.items():
        if entry.data_offsets[0] != position:
            raise _corrupt(path, f"tensor {name!r} data overlaps another or leaves a gap")
        position = entry.data_offsets[1]
    if position != data_bytes:
        raise _corrupt(path, f"{data_bytes - position} bytes of data after the last tensor")


def _read_index(index_path: Path) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: corrupt index: invalid JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise CheckpointError(f"{index_path}: corrupt index: no weight_map of tensor -> shard file")
    return weight_map


def _index_shards(model_dir: Path, weight_map: dict[str, str]) -> list[Path]:
    shards = [model_dir / shard for shard in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(
                f"{model_dir / INDEX_FILE}: names shard {shard.name!r}, which is missing"
            )
    return shards


def _discover_files(model_dir: Path, weight_map: dict[str, str] | None) -> list[Path]:
    if weight_map is not None:
        return _index_shards(model_dir, weight_map)
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(
            f"{model_dir}: no safetensors checkpoint "
            f"(looked for {INDEX_FILE}, {SINGLE_FILE}, then *.safetensors)"
        )
    return files


def _check_index_matches(
    model_dir: Path, weight_map: dict[str, str], entries: dict[str, TensorEntry]
) -> None:
    """The index and the shard headers must agree on every tensor, both ways."""
    index_path = model_dir / INDEX_FILE
    for name, shard in weight_map.items():
        entry = entries.get(name)
        if entry is None or entry.file != model_dir / shard:
            raise CheckpointError(
                f"{index_path}: lists tensor {name!r} in shard {shard!r}, which does not contain it"
            )
    for name, entry in entries.items():
        if name not in weight_map:
            raise CheckpointError(
                f"{index_path}: does not list tensor {name!r}, stored in shard {entry.file.name!r}"
            )


class CheckpointReader:
    """Streams tensors from a Hugging Face model directory's safetensors, tensor by tensor."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a directory")
        index_path = self.model_dir / INDEX_FILE
        weight_map = _read_index(index_path) if index_path.is_file() else None
        self._entries: dict[str, TensorEntry] = {}
        for file in _discover_files(self.model_dir, weight_map):
            self._add_file(file)
        if weight_map is not None:
            _check_index_matches(self.model_dir, weight_map, self._entries)
        self._open_file: Path | None = None
        self._open_handle = None

    def _add_file(self, file: Path) -> None:
        for name, entry in read_header(file).items():
            if name in self._entries:
                raise CheckpointError(
                    f"{self.model_dir}: tensor {name!r} is in two shards: "
                    f"{self._entries[name].file.name} and {file.name}"
                )
            self._entries[name] = entry

    @property
    def names(self) -> list[str]:
        """Every tensor name: files in order, and within a file in the order of its data."""
        return list(self._entries)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(entry.file for entry in self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> TensorEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.model_dir}: no tensor named {name!r}")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """One tensor on the CPU, a view of the memory-mapped file."""
        return self._handle(self._entry(name).file).get_tensor(name)

    def _handle(self, file: Path):
        # One open file at a time: names are grouped by file, so streaming opens each once.
        if file != self._open_file:
            self._open_handle = None  # release the previous file before mapping the next
            self._open_handle = safe_open(file, framework="pt", device="cpu")
            self._open_file = file
        return self._open_handle

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._entries:
            yield name, self.get(name)  # no local reference: the caller holds the only one
