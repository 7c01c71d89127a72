"""Build a model from a Hugging Face directory: config -> architecture -> weights streamed in."""

from pathlib import Path

import torch

from krasis.common.model_config import read_hf_config
from krasis.common.models import model_class
from krasis.common.weights.checkpoint import CheckpointReader
from krasis.common.weights.load import load_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """The model in eval mode on `device`, every parameter filled from the checkpoint."""
    raw = read_hf_config(model_dir)
    cls = model_class(raw["model_type"])
    cfg = cls.config_class.from_hf(raw)
    reader = CheckpointReader(model_dir)  # validates every file's header before anything is built
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device=device).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith(getattr(model, "fp32_parameters", ())):
            param.data = param.data.float()
    model.tie_weights()
    optional = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    load_weights(model, reader, optional=optional)
    return model.eval().requires_grad_(False)
