"""Model + tokenizer loading shared by the CLI commands (torch is imported only when loading)."""

from dataclasses import dataclass

import click


@dataclass(frozen=True)
class WeightOptions:
    """Where the weights come from and how they are held, as the CLI options give them."""

    model_dir: str | None
    dtype: str = "bf16"
    device: str = "cpu"
    quant: str = "none"
    dense_quant: str = "bf16"
    cache_dir: str | None = None
    vram_budget_gib: float | None = None  # GPU prefill: None = free VRAM minus a margin


def load_for_generation(options: WeightOptions):
    import torch

    from krasis.common.default_model import default_model_dir
    from krasis.common.model_loader import load_model, resolve_dtype
    from krasis.common.quant.plan import QuantPlan
    from krasis.common.tokenizer import Tokenizer

    if options.device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA GPU is available")
    directory = options.model_dir or default_model_dir()
    plan = QuantPlan.parse(options.quant, options.dense_quant)
    model = load_model(
        directory, dtype=resolve_dtype(options.dtype), device=options.device, quant=plan, cache_root=options.cache_dir
    )
    return model, Tokenizer.from_dir(directory)
