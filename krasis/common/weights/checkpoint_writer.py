"""Writes tensors as a Hugging Face safetensors checkpoint, sharded with an index when asked."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from krasis.common.weights.checkpoint import INDEX_FILE, SINGLE_FILE


def save_sharded(
    tensors: dict[str, torch.Tensor], model_dir: str | Path, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
    `model.safetensors.index.json` when the tensors exceed max_shard_bytes. Returns the files."""
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if (model_dir / INDEX_FILE).exists() or any(model_dir.glob("*.safetensors")):
        raise FileExistsError(f"{model_dir}: already holds a safetensors checkpoint")
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save_shard(shards[0], model_dir / SINGLE_FILE)
        return [model_dir / SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = model_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, file)
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file.name))
    total_size = sum(_nbytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _plan_shards(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int | None
) -> list[dict[str, torch.Tensor]]:
    """Greedy in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        nbytes = _nbytes(tensor)
        if max_shard_bytes is not None and shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
    return shards


def _save_shard(shard: dict[str, torch.Tensor], file: Path) -> None:
    # safetensors refuses tensors sharing storage (tied embeddings, views); the clone is
    # bounded by one shard.
    owned = {
        name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for name, t in shard.items()
    }
    save_file(owned, file, metadata={"format": "pt"})
