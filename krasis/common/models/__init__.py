"""Registry of supported architectures: `model_type` -> model class, imported only when used."""

import importlib

from krasis.common.model_config import ConfigError

_REGISTRY = {
    "qwen3_moe": ("krasis.common.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "deepseek_v2": ("krasis.common.models.deepseek_v2", "DeepseekV2ForCausalLM"),
    "qwen3_next": ("krasis.common.models.qwen3_next", "Qwen3NextForCausalLM"),
    "qwen3_5_moe": ("krasis.common.models.qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_REGISTRY))


def model_class(model_type: str):
    if model_type not in _REGISTRY:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    module, name = _REGISTRY[model_type]
    return getattr(importlib.import_module(module), name)
