"""Model modules over quantized weights, and swapping a cache's quantized weights into a model."""

import torch
import torch.nn.functional as F
from torch import nn

from krasis.common.layers.moe import StackedExperts
from krasis.common.quant.cpu_kernels import decode_bf16_linear, quant_linear
from krasis.common.quant.formats import QuantizedWeight
from krasis.common.quant.plan import ROUTER_SUFFIXES


class QuantLinear(nn.Module):
    """nn.Linear's role over a QuantizedWeight [N, K], read by the CPU kernels in place (never copied)."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.weight_q = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]. A 2-d x (every call from a model) goes to the kernel as it is: the reshape and
        # view around it are two torch ops, ~5 us of host time, for each of a decode layer's quantized linears.
        if x.dim() == 2:
            out = quant_linear(x, self.weight_q)
        else:
            out = quant_linear(x.reshape(-1, x.shape[-1]), self.weight_q).view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    # Calls go straight to forward, past nn.Module.__call__'s hook checks (~1 us a call, several calls a decode
    # layer): this module exists only in CPU inference models, which nothing hooks.
    __call__ = forward


class DecodeLinear(nn.Linear):
    """nn.Linear whose bf16 CPU products of up to DENSE_MAX_ROWS rows (decode steps) go through the bf16 GEMV
    kernel, which streams the weight near read bandwidth; anything else is F.linear, as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]. The parameters come straight from their dict: `self.weight` is a failed attribute
        # lookup, then a Module.__getattr__ call (~1.3 us on Python 3.11), two a call, ~4 calls a decode layer.
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        y = decode_bf16_linear(x, weight, bias)
        return F.linear(x, weight, bias) if y is None else y

    __call__ = forward  # as QuantLinear's


def use_decode_linears(model: nn.Module) -> None:
    """Make every plain nn.Linear of `model` a DecodeLinear (same parameters), routers excepted: their bf16
    rounding decides which experts run, so they keep torch's."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not f".{name}.weight".endswith(ROUTER_SUFFIXES):
            module.__class__ = DecodeLinear


def swap_in_quantized(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Replace each named weight (`...q_proj.weight`, `...experts.gate_up_proj`) by its quantized form; the
    linears left unquantized become DecodeLinear (the model is for the CPU decode kernels)."""
    for name, weight in quantized.items():
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and attr == "weight":
            if tuple(module.weight.shape) != weight.shape:
                raise ValueError(f"{name}: quantized shape {weight.shape}, model expects {tuple(module.weight.shape)}")
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear(weight, module.bias))
        elif isinstance(module, StackedExperts):
            module.use_quantized(attr, weight)
        else:
            raise ValueError(f"{name}: the model has no linear or experts weight there to quantize")
    use_decode_linears(model)
