"""Reading a Hugging Face `config.json` in both its Hub and transformers-5 spellings."""

import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A model directory's config.json is missing, unreadable or unsupported."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalized from `rope_scaling` + `rope_theta` or `rope_parameters`."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf(cls, raw: dict, default_theta: float = 10000.0) -> "RopeConfig":
        params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        theta = raw.get("rope_theta") or params.get("rope_theta") or default_theta
        original_max = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        if rope_type == "yarn" and original_max is None:
            original_max = raw.get("max_position_embeddings")
        partial = raw.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=params.get("factor"),
            original_max_position_embeddings=original_max,
            attention_factor=params.get("attention_factor"),
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=params.get("truncate", True),
            partial_rotary_factor=float(partial),
        )


def read_hf_config(model_dir: str | Path) -> dict:
    """config.json as a dict; multimodal wrappers keep the text model under `text_config`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable config: {exc}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"{path}: no model_type field")
    return _flatten_text_config(raw)


def _flatten_text_config(raw: dict) -> dict:
    """A multimodal wrapper's text model fields at the top, under the wrapper's model_type; the wrapper's own
    fields (tie_word_embeddings, quantization_config) win, as the wrapper's are the ones transformers applies."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        return raw
    outer = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config", "audio_config")}
    return {**text, **outer}


def require(raw: dict, *names: str):
    """The first of `names` present in the config (configs spell some fields several ways)."""
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    raise ConfigError(f"config.json lacks {' / '.join(names)}")
