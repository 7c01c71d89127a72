"""The q8 and q4 weight formats: one layout each, read directly by the CPU kernels and dequantized
on a GPU with a few elementwise ops.

Layout of a logical weight [..., N, K] (leading dims are e.g. experts), groups of G along K:
- q8: qweight int8 [..., N, K], values in [-127, 127].
- q4: qweight uint8 [..., N, K // 2]; byte j of a row holds element 2j in its low nibble and element
  2j + 1 in its high nibble, each stored as q + 8 (q in [-7, 7], so stored 1..15).
- scales: bf16 [..., N, K // G]; the weight is q * scale. bf16 rather than fp32 halves the scale
  bytes (q4 at g32: 4.5 bits a weight, not 5) and keeps fp32's range; q * scale is then exact in
  fp32, so every kernel and the GPU see the same weights. The scale is rounded *up* to bf16 and the
  weight quantized against that stored scale, so |w - q * scale| <= scale / 2 still holds.
Group sizes are multiples of 32 (CHUNK), the unit the CPU kernels unpack at once; K must be too.
"""

from dataclasses import dataclass

import torch

QUANT_FORMATS = ("q8", "q4")
QMAX = {"q8": 127, "q4": 7}
DEFAULT_GROUP = {"q8": 128, "q4": 32}
CHUNK = 32
SCALE_DTYPE = torch.bfloat16
_QUANTIZE_BLOCK = 1 << 22  # elements quantized at once: bounds the fp32 temporaries of a big tensor


@dataclass(frozen=True)
class QuantSpec:
    """A format and its group size along K; group_size 0 means one scale per output channel."""

    format: str
    group_size: int = None  # type: ignore[assignment]  # None -> the format's default

    def __post_init__(self):
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"unknown quant format {self.format!r}; supported: {', '.join(QUANT_FORMATS)}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP[self.format])
        if not isinstance(self.group_size, int) or self.group_size < 0 or self.group_size % CHUNK:
            raise ValueError(
                f"{self.format}: group size {self.group_size!r} must be a positive multiple of {CHUNK} "
                "(or 0 for one scale per channel)"
            )

    @staticmethod
    def parse(text: str) -> "QuantSpec":
        """"q4", "q8", "q4:g64", "q8:channel" -> QuantSpec; ValueError naming the text otherwise."""
        fmt, _, group = str(text).strip().lower().partition(":")
        usage = f"quant spec {text!r}: expected FORMAT[:gN|:channel] with FORMAT in {', '.join(QUANT_FORMATS)}"
        if fmt not in QUANT_FORMATS:
            raise ValueError(usage)
        if not group:
            return QuantSpec(fmt)
        if group == "channel":
            return QuantSpec(fmt, 0)
        if not (group.startswith("g") and group[1:].isdigit() and int(group[1:]) > 0):
            raise ValueError(usage)
        return QuantSpec(fmt, int(group[1:]))

    def __str__(self) -> str:
        return f"{self.format}:{'channel' if self.group_size == 0 else f'g{self.group_size}'}"

    def group_for(self, k: int) -> int:
        return k if self.group_size == 0 else self.group_size


@dataclass
class QuantizedWeight:
    """A quantized [..., N, K] weight: packed values plus one bf16 scale per group."""

    spec: QuantSpec
    shape: tuple[int, ...]
    qweight: torch.Tensor  # q8: int8 [..., N, K]; q4: uint8 [..., N, K // 2]
    scales: torch.Tensor  # bf16 [..., N, K // G]

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        expected_q, expected_s = storage_shapes(self.spec, self.shape)
        q_dtype = torch.int8 if self.spec.format == "q8" else torch.uint8
        for name, tensor, shape, dtype in (
            ("qweight", self.qweight, expected_q, q_dtype),
            ("scales", self.scales, expected_s, SCALE_DTYPE),
        ):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"{self.spec} weight {self.shape}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"expected {dtype} {shape}"
                )

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def __getitem__(self, index: int) -> "QuantizedWeight":
        """One slice along the first leading dim, e.g. one expert of [E, N, K] (a view, no copy)."""
        if len(self.shape) < 3:
            raise IndexError(f"{self.spec} weight {self.shape} has no leading dim to index")
        return QuantizedWeight(self.spec, self.shape[1:], self.qweight[index], self.scales[index])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}

    @classmethod
    def from_tensors(cls, prefix: str, tensors, spec: QuantSpec, shape) -> "QuantizedWeight":
        """Rebuild from a safetensors mapping; a missing or mis-shaped tensor is a ValueError naming it."""
        names = (f"{prefix}.qweight", f"{prefix}.scales")
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ValueError(f"quantized weight {prefix!r} ({spec}): missing {', '.join(missing)}")
        try:
            return cls(spec, tuple(shape), tensors[names[0]], tensors[names[1]])
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from None


def storage_shapes(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(qweight shape, scales shape) of a logical [..., N, K] weight; ValueError if K doesn't fit."""
    if len(shape) < 2:
        raise ValueError(f"{spec}: weight shape {tuple(shape)} is not [..., N, K]")
    k = shape[-1]
    group = spec.group_for(k)
    if k == 0 or k % group or k % CHUNK:
        raise ValueError(
            f"{spec}: weight shape {tuple(shape)} has K={k}, which must be a positive multiple of "
            f"the group size {group} and of {CHUNK}"
        )
    packed_k = k if spec.format == "q8" else k // 2
    return (*shape[:-1], packed_k), (*shape[:-1], k // group)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] in 0..15 -> uint8 [..., K // 2]: element 2j in the low nibble, 2j + 1 in the high."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K], the inverse of pack_nibbles."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def round_up_to_bf16(scale: torch.Tensor) -> torch.Tensor:
    """fp32 (positive, finite) -> the smallest bf16 >= it: add the dropped bits' max, then truncate."""
    bits = scale.contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32).to(SCALE_DTYPE)


def quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Symmetric round-to-nearest quantization of weight [..., N, K], scale = max|w| / qmax per group."""
    shape = tuple(weight.shape)
    q_shape, s_shape = storage_shapes(spec, shape)
    if not weight.is_floating_point():
        raise ValueError(f"quantize {spec}: weight {shape} is {weight.dtype}, not a floating-point tensor")
    k = shape[-1]
    rows = weight.reshape(-1, k)
    q_dtype = torch.int8 if spec.format == "q8" else torch.uint8
    qweight = torch.empty((rows.shape[0], q_shape[-1]), dtype=q_dtype, device=weight.device)
    scales = torch.empty((rows.shape[0], s_shape[-1]), dtype=SCALE_DTYPE, device=weight.device)
    step = max(1, _QUANTIZE_BLOCK // k)
    for start in range(0, rows.shape[0], step):
        q, s = _quantize_rows(rows[start : start + step], spec, shape)
        qweight[start : start + step], scales[start : start + step] = q, s
    return QuantizedWeight(spec, shape, qweight.view(q_shape), scales.view(s_shape))


def _quantize_rows(rows: torch.Tensor, spec: QuantSpec, shape) -> tuple[torch.Tensor, torch.Tensor]:
    # rows: [R, K] -> (packed [R, K or K // 2], bf16 scales [R, K // G])
    qmax, group = QMAX[spec.format], spec.group_for(rows.shape[-1])
    grouped = rows.float().view(rows.shape[0], -1, group)
    amax = grouped.abs().amax(dim=-1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"quantize {spec}: weight {shape} holds inf or nan")
    scales = round_up_to_bf16(amax / qmax)
    divisor = torch.where(scales == 0, 1.0, scales.float()).unsqueeze(-1)  # all-zero group: q = 0
    q = torch.round(grouped / divisor).clamp_(-qmax, qmax).view(rows.shape[0], -1)
    if spec.format == "q8":
        return q.to(torch.int8), scales
    return pack_nibbles((q + 8).to(torch.uint8)), scales


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuantizedWeight -> [..., N, K] in dtype, on the tensors' device (q * scale, exact in fp32)."""
    if qw.spec.format == "q8":
        values = qw.qweight.float()
    else:
        values = unpack_nibbles(qw.qweight).float() - 8
    k = qw.shape[-1]
    group = qw.spec.group_for(k)
    grouped = values.view(*qw.shape[:-1], k // group, group) * qw.scales.float().unsqueeze(-1)
    return grouped.view(qw.shape).to(dtype)
