"""The embedded default model: a tiny deterministic Qwen3-MoE checkpoint generated on first use.

Its weights are random, so its text is not meaningful; it exists so `krasis-ctl` runs with no download.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

from krasis.common.env import krasis_home
from krasis.common.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from krasis.common.tokenizer.builder import write_tokenizer_files
from krasis.common.weights.checkpoint_writer import save_sharded

NAME = "krasis-tiny-moe-v1"
SEED = 20261127

CONFIG = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "moe_intermediate_size": 128,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def default_model_dir() -> Path:
    """The default model's directory, generated (atomically, once) if it isn't there yet."""
    target = krasis_home() / "models" / NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        _write(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write(out_dir: Path) -> None:
    vocab_size = write_tokenizer_files(out_dir, style="chatml")
    raw = {**CONFIG, "vocab_size": vocab_size}
    eos = json.loads((out_dir / "tokenizer_config.json").read_text())["eos_token"]
    eos_id = Tokenizer.from_file(str(out_dir / "tokenizer.json")).token_to_id(eos)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_sharded(_random_weights(Qwen3MoeConfig.from_hf(raw)), out_dir)


def _random_weights(cfg: Qwen3MoeConfig) -> dict[str, torch.Tensor]:
    """Deterministic weights scaled so activations stay O(1) and the next-token distribution is peaked."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Qwen3MoeForCausalLM(cfg).named_parameters()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            value = torch.ones(shape)
        elif "embed_tokens" in name:
            value = torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) * (2.0 / shape[-1] ** 0.5)
        tensors[name] = value.to(torch.bfloat16)
    return tensors
