"""The models a benchmark runs: decode from the memory-mapped quantized cache on the CPU, prefill on the chosen
device (on cuda the streaming prefill over that same cache), and copies of the same weights for the transformers
reference."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from krasis.common.layers.moe import StackedExperts
from krasis.common.quant.formats import QuantizedWeight, dequantize
from krasis.common.quant.modules import QuantLinear

@dataclass(frozen=True)
class PrefillSetup:
    """The model GpuPrefillCore runs (with its streaming runner on cuda), and the weight bytes that cross PCIe
    once per prompt (0: all resident)."""

    model: nn.Module
    runner: object | None  # krasis.gpu_worker.streaming.StreamingPrefill
    streamed_bytes: int
    plan: str  # the report's description


def prefill_setup(
    decode_model: nn.Module, device: str, vram_budget_gib: float | None, chunk_tokens: int, longest_prompt: int
) -> PrefillSetup:
    """cpu: the decode model itself. cuda: the streaming prefill over the decode model's memory-mapped cache (routed
    experts registered with CUDA, resident or streamed as the VRAM plan for `vram_budget_gib` says), every prompt
    in one step, so its streamed bytes cross PCIe once per prompt."""
    if device == "cpu":
        return PrefillSetup(decode_model, None, 0, "cpu: the decode model itself (quantized cache, memory-mapped)")
    from krasis.gpu_worker.prefill_runner import build_prefill_runner

    kv_bytes = decode_model.model.embed_tokens.weight.element_size()  # the KV pool holds the run dtype
    runner = build_prefill_runner(decode_model, device, vram_budget_gib, chunk_tokens=chunk_tokens,
                                  step_tokens=longest_prompt, kv_dtype_bytes=kv_bytes)  # fmt: skip
    return PrefillSetup(runner.model, runner, runner.plan.streamed_bytes, runner.plan.describe())


def weights_of(model: nn.Module) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Every weight under the unquantized architecture's parameter names, quantized ones as QuantizedWeight."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, param in module.named_parameters(recurse=False):
            yield prefix + key, param
        if isinstance(module, QuantLinear):
            yield prefix + "weight", module.weight_q
        if isinstance(module, StackedExperts):
            yield from ((prefix + key, weight) for key, weight in module.quantized.items())


@torch.inference_mode()
def fill_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy `source`'s weights into `target` (same parameter names), dequantizing on the target's device."""
    params = dict(target.named_parameters(remove_duplicate=False))
    filled = set()
    for name, weight in weights_of(source):
        param = params[name]
        if isinstance(weight, QuantizedWeight):
            parts = (weight.qweight.to(param.device), weight.scales.to(param.device))
            weight = dequantize(QuantizedWeight(weight.spec, weight.shape, *parts), param.dtype)
        param.copy_(weight)
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"{type(target).__name__}: no weight for {len(missing)} parameters, e.g. {missing[0]}")


def peak_memory(device: str) -> dict[str, float]:
    """Peak RSS of this process (and peak CUDA allocated / reserved) in GB."""
    import resource

    peaks = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # Linux: KiB
    if device == "cuda":
        peaks["vram_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        peaks["vram_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return peaks
