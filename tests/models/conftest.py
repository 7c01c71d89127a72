"""Session fixtures: tiny checkpoints per variant, their transformers reference and our model."""

import pytest
import torch

from krasis.common.model_loader import load_model
from tests.models.tiny_checkpoints import VARIANTS, build_checkpoint, load_reference


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    built = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = build_checkpoint(variant, tmp_path_factory.mktemp(variant))
        return built[variant]

    return get


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture
def model_dir(checkpoint_dirs, variant):
    return checkpoint_dirs(variant)


@pytest.fixture
def reference(model_dir, variant):
    model = load_reference(model_dir)
    if variant == "deepseek_v2-normtopk":
        normalize_reference_topk(model)
    return model


@pytest.fixture
def ours(model_dir):
    return load_model(model_dir, dtype=torch.float32)


def normalize_reference_topk(model) -> None:
    """transformers 5 ignores deepseek_v2's norm_topk_prob; give its routers DeepSeek's normalization."""
    for module in model.modules():
        if type(module).__name__ == "DeepseekV2TopkRouter":
            original = module.forward

            def forward(hidden_states, original=original, module=module):
                logits, weights, ids = original(hidden_states)
                weights = weights / module.routed_scaling_factor
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
                return logits, weights * module.routed_scaling_factor, ids

            module.forward = forward
