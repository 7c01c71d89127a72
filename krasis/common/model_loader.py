"""Build a model from a Hugging Face directory: config -> architecture -> weights streamed in."""

from pathlib import Path

import torch

from krasis.common.model_config import read_hf_config
from krasis.common.models import model_class
from krasis.common.quant.cache import ensure_cache, open_cache
from krasis.common.quant.modules import swap_in_quantized, use_decode_linears
from krasis.common.quant.plan import QuantPlan
from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader
from krasis.common.weights.load import load_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def empty_model(model_dir: str | Path):
    """The architecture for this directory, built on the meta device (no memory yet)."""
    raw = read_hf_config(model_dir)
    cls = model_class(raw["model_type"])
    with torch.device("meta"):
        return cls(cls.config_class.from_hf(raw))


def materialize(model, dtype: torch.dtype, device: str):
    """A model built on the meta device -> real, uninitialized tensors of `dtype` on `device` (its fp32 parameters
    stay fp32, tied weights stay tied), ready for loading."""
    model = model.to_empty(device=device).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith(getattr(model, "fp32_parameters", ())):
            param.data = param.data.float()
    model.tie_weights()
    return model


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    quant: QuantPlan | None = None,
    cache_root: str | Path | None = None,
):
    """The model in eval mode on `device`, every parameter filled from the checkpoint (or its quantized cache)."""
    if quant is not None and (quant.experts or quant.dense):
        return _load_quantized(model_dir, dtype, device, quant, cache_root)
    model = empty_model(model_dir)
    reader = CheckpointReader(model_dir)  # validates every file's header before memory is allocated
    model = materialize(model, dtype, device)
    optional = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
    load_weights(model, reader, optional=optional)
    if torch.device(device).type == "cpu":
        use_decode_linears(model)  # bf16 decode-sized products through the CPU kernels
    return model.eval().requires_grad_(False)


def _load_quantized(model_dir, dtype: torch.dtype, device: str, plan: QuantPlan, cache_root=None):
    """Quantized weights stay in the memory-mapped cache; kept weights of the model dtype map it too."""
    if device != "cpu":
        raise ValueError("quantized weights run on the CPU kernels; GPU dequantization comes with GPU prefill")
    cache = open_cache(ensure_cache(model_dir, plan, cache_root=cache_root), model_dir=model_dir)
    model = empty_model(model_dir)
    swap_in_quantized(model, {name: cache.quantized(name) for name in cache.quantized_names})
    model = materialize(model, dtype, device)
    params = dict(model.named_parameters())
    stored = {n for n in cache.names if not n.endswith((".qweight", ".scales"))}
    missing, unexpected = sorted(set(params) - stored), sorted(stored - set(params) - {"lm_head.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{cache.path}: cache does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        tensor = cache.get(name)
        # Same dtype: use the mapped pages themselves (shared by every process); else convert once.
        param.data = tensor if tensor.dtype == param.dtype else tensor.to(param.dtype)
    return model.eval().requires_grad_(False)
