"""Model + tokenizer loading shared by the CLI commands."""

import click
import torch

from krasis.common.default_model import default_model_dir
from krasis.common.model_loader import load_model, resolve_dtype
from krasis.common.tokenizer import Tokenizer


def load_for_generation(model_dir: str | None, dtype: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA GPU is available")
    directory = model_dir or default_model_dir()
    model = load_model(directory, dtype=resolve_dtype(dtype), device=device)
    tokenizer = Tokenizer.from_dir(directory)
    return model, tokenizer
