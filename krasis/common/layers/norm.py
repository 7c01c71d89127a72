"""RMSNorms as the references compute them: plain (scale in the model dtype), zero-centred, gated.

`torch.rms_norm` on an fp32 input runs the references' exact ops (x * rsqrt(mean(x^2) + eps), then times the
weight) bit for bit, as one call instead of five: decode runs several norms a layer, each op ~10 us of host time.
A bf16 RMSNorm on the CPU (the decode pool) is one kernel call instead of that call's ~10 ops and the casts around
it (~40 us on dev2 against ~3): the same roundings, the sum of squares in another order (bit-equal in bf16 in
practice; fp32 keeps torch's ops, the exactness reference). A GPU's bf16 norm (prefill) is one Triton pass, add
included (krasis.common.kernels.gpu.rowwise), within a bf16 rounding of torch's ops.
"""

import torch
import torch.nn.functional as F
from torch import nn

from krasis.common.kernels.cpu import decode_ops
from krasis.common.kernels.gpu import rowwise


def _cpu_bf16(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.bfloat16


class RMSNorm(nn.Module):
    """Normalize in fp32, scale in the model dtype (Llama, Qwen3, DeepSeek)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._parameters["weight"]  # not self.weight, a Module.__getattr__ call (~1 us; 3 norms a layer)
        if _cpu_bf16(x) and (y := decode_ops.rms_norm(x, weight, self.eps)) is not None:
            return y
        if rowwise.rms_norm_fits(x, weight):  # a GPU's bf16 prefill: one pass instead of four
            return rowwise.rms_norm(x, weight, self.eps)
        normed = torch.rms_norm(x.float(), weight.shape, eps=self.eps)
        return weight * normed.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, the norm of that sum): a layer's residual add and the norm after it, one kernel call where
        `forward` has one."""
        weight = self._parameters["weight"]
        if _cpu_bf16(x) and (fused := decode_ops.add_rms_norm(x, y, weight, self.eps)) is not None:
            return fused
        if rowwise.rms_norm_fits(x, weight, y):
            return rowwise.rms_norm(x, weight, self.eps, residual=y)
        total = x + y
        return total, self(total)


class ZeroCenteredRMSNorm(nn.Module):
    """Qwen3-Next / Qwen3.5 RMSNorm: the weight is stored around 0 and scales by (1 + w), all in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = torch.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x + y
        return total, self(total)


class GatedRMSNorm(nn.Module):
    """RMSNorm of x, then times silu(gate) in fp32 (Gated DeltaNet's output norm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = torch.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        scaled = self.weight * normed.to(x.dtype)
        return (scaled * F.silu(gate.float())).to(x.dtype)
