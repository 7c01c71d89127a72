"""FP8 e4m3 block-scaled checkpoints (the official Qwen3-Next and DeepSeek FP8 releases):
`X.weight` float8_e4m3fn [N, K] times `X.weight_scale_inv` fp32 [ceil(N/bn), ceil(K/bk)]."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
FP8_DTYPES = (torch.float8_e4m3fn,)
DEQUANTIZED_DTYPE = torch.bfloat16  # the dtype of the official releases' unquantized tensors


def block_size(config: dict) -> tuple[int, int]:
    """`quantization_config.weight_block_size` from config.json, default [128, 128]."""
    block = (config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size {block!r} is not two positive ints")
    return tuple(block)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight: [..., N, K] fp8, scale_inv: [..., ceil(N/bn), ceil(K/bk)] (or one scalar) -> fp32 [..., N, K]."""
    if scale_inv.numel() == 1:
        return weight.float() * scale_inv.float().reshape(())
    (n, k), (bn, bk) = weight.shape[-2:], block
    lead = weight.shape[:-2]
    if n % bn == 0 and k % bk == 0:  # broadcast the scale over each block without expanding it
        blocks = weight.float().view(*lead, n // bn, bn, k // bk, bk) * scale_inv.float()[..., :, None, :, None]
        return blocks.view(*lead, n, k)
    scale = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return weight.float() * scale


@dataclass(frozen=True)
class SourceTensor:
    """One model tensor as stored: a lazy memory-mapped view, plus its FP8 scale when it has one.
    Fetched on the reader's thread; `load` may run on any thread."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None
    block: tuple[int, int] = DEFAULT_BLOCK

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype to keep it in unquantized: bf16 for FP8 sources, else as stored."""
        return self.weight.dtype if self.scale_inv is None else DEQUANTIZED_DTYPE

    def load(self) -> torch.Tensor:
        """The tensor's values: fp32 when dequantized from FP8, else the stored tensor."""
        if self.scale_inv is None:
            return self.weight
        return dequantize_fp8(self.weight, self.scale_inv, self.block)


class DequantizingReader:
    """A checkpoint's tensors as the model sees them: FP8 weights dequantized, their scales consumed.
    Iterates like CheckpointReader, so `load_weights` takes it as it is."""

    def __init__(self, reader: CheckpointReader, config: dict, rename: Callable[[str], str | None] | None = None):
        """`rename`: the model's name for a checkpoint tensor, None to leave it out (models.base.CausalLM)."""
        self.reader = reader
        self.block = block_size(config)
        self._scales = _pair_scales(reader, self.block)
        self._source: dict[str, str] = {}  # our name -> checkpoint name
        for name in (n for n in reader.names if n not in self._scales.values()):
            ours = rename(name) if rename is not None else name
            if ours is not None:
                self._source[ours] = name
        self.names = list(self._source)

    @property
    def model_dir(self):
        return self.reader.model_dir

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self._source[name])

    def source_nbytes(self, name: str) -> int:
        """Bytes read from the checkpoint for this tensor, its scale included."""
        name = self._source[name]
        names = (name, self._scales[name]) if name in self._scales else (name,)
        return sum(torch.Size(self.reader.shape(n)).numel() * self.reader.dtype(n).itemsize for n in names)

    def fetch(self, name: str) -> SourceTensor:
        name = self._source[name]
        scale = self._scales.get(name)
        if scale is None:
            return SourceTensor(self.reader.get(name))
        return SourceTensor(self.reader.get(name), self.reader.get(scale), self.block)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.fetch(name).load()


def dequantized_tensors(reader: CheckpointReader, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, FP8 block-scaled weights as fp32, no `weight_scale_inv` left."""
    return iter(DequantizingReader(reader, config))


def _pair_scales(reader: CheckpointReader, block: tuple[int, int]) -> dict[str, str]:
    """weight name -> its scale's name, after checking every FP8 weight has a scale that fits it."""
    pairs = {}
    for scale in (n for n in reader.names if n.endswith(SCALE_SUFFIX)):
        weight = scale.removesuffix(SCALE_SUFFIX)
        if weight not in reader or reader.dtype(weight) not in FP8_DTYPES:
            raise CheckpointError(f"{reader.model_dir}: {scale} has no float8_e4m3fn tensor {weight} to scale")
        _check_scale_shape(reader, weight, scale, block)
        pairs[weight] = scale
    for name in reader.names:
        if reader.dtype(name) in FP8_DTYPES and name not in pairs:
            raise CheckpointError(
                f"{reader.model_dir}: FP8 tensor {name} has no {name}{SCALE_SUFFIX} "
                "(only block-scaled FP8 checkpoints are supported)"
            )
    return pairs


def _check_scale_shape(reader: CheckpointReader, weight: str, scale: str, block: tuple[int, int]) -> None:
    shape, scale_shape = reader.shape(weight), reader.shape(scale)
    if len(shape) < 2:
        raise CheckpointError(f"{reader.model_dir}: FP8 tensor {weight} has shape {shape}, expected [..., N, K]")
    blocks = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    if scale_shape != blocks and torch.Size(scale_shape).numel() != 1:
        raise CheckpointError(
            f"{reader.model_dir}: {scale} has shape {scale_shape}; {weight} {shape} in {block[0]}x{block[1]} "
            f"blocks needs {blocks}"
        )
