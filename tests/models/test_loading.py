"""Loading model directories: both config spellings, sharded and stacked layouts, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from krasis.common.model_config import ConfigError
from krasis.common.model_loader import load_model
from krasis.common.weights.checkpoint import CheckpointError
from krasis.common.weights.checkpoint_writer import save_sharded
from tests.models.harness import teacher_forced_logits

TOKENS = list(range(3, 43))


@pytest.fixture
def lite_dir(checkpoint_dirs, tmp_path):
    copy = tmp_path / "lite"
    shutil.copytree(checkpoint_dirs("deepseek_v2-lite"), copy)
    return copy


def _edit_config(model_dir, edit) -> None:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _hub_spelling(raw: dict) -> None:
    """Rewrite a transformers-5 config the way the Hub publishes it (rope_theta + rope_scaling)."""
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope.pop("rope_type")
    raw["rope_scaling"] = rope if rope.get("type") else None
    if "num_local_experts" in raw:
        raw["num_experts"] = raw.pop("num_local_experts")


@pytest.mark.parametrize("name", ["deepseek_v2-lite", "qwen3_moe-base"])
def test_hub_config_spelling_loads_the_same_model(checkpoint_dirs, tmp_path, name):
    original = checkpoint_dirs(name)
    hub = tmp_path / "hub"
    shutil.copytree(original, hub)
    _edit_config(hub, _hub_spelling)
    assert "rope_parameters" not in json.loads((hub / "config.json").read_text())
    expected = teacher_forced_logits(load_model(original, dtype=torch.float32), TOKENS)
    assert torch.equal(teacher_forced_logits(load_model(hub, dtype=torch.float32), TOKENS), expected)


def test_sharded_checkpoint_with_stacked_experts_loads_the_same_model(checkpoint_dirs, tmp_path):
    original = checkpoint_dirs("qwen3_moe-base")
    model = load_model(original, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(original / name, sharded / name)
    files = save_sharded(dict(model.state_dict()), sharded, max_shard_bytes=200_000)
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").is_file()
    reloaded = load_model(sharded, dtype=torch.float32)
    assert torch.equal(teacher_forced_logits(reloaded, TOKENS), teacher_forced_logits(model, TOKENS))


def test_missing_tensor_is_named(lite_dir):
    tensors = load_file(lite_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, lite_dir / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(lite_dir)
    message = str(err.value)
    assert "2 missing tensors" in message
    assert "model.layers.1.self_attn.kv_b_proj.weight" in message
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in message


def test_unexpected_tensor_is_named(lite_dir):
    tensors = load_file(lite_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, lite_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor: model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"):
        load_model(lite_dir)


def test_wrong_shape_is_named(lite_dir):
    tensors = load_file(lite_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, lite_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint shape \(7,\), model expects \(64,\)"):
        load_model(lite_dir)


def test_unknown_model_type_lists_supported(lite_dir):
    _edit_config(lite_dir, lambda raw: raw.update(model_type="llama4"))
    supported = "deepseek_v2, qwen3_5_moe, qwen3_moe, qwen3_next"
    with pytest.raises(ConfigError, match=rf"unsupported model_type 'llama4'; supported: {supported}"):
        load_model(lite_dir)


def test_truncated_file_is_a_clear_error(lite_dir):
    path = lite_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(lite_dir)


def test_corrupt_header_is_a_clear_error(lite_dir):
    path = lite_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(lite_dir)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def test_qwen3_5_text_model_loads_without_vision_tower_or_mtp_head(checkpoint_dirs, tmp_path):
    copy = tmp_path / "qwen3_5"
    shutil.copytree(checkpoint_dirs("qwen3_5_moe-base"), copy)
    tensors = load_file(copy / "model.safetensors")
    assert any(name.startswith("model.visual.") for name in tensors)
    expected = teacher_forced_logits(load_model(copy, dtype=torch.float32), TOKENS)
    tensors["mtp.fc.weight"] = torch.ones(2, 2)  # the published checkpoints carry a multi-token-prediction head
    del tensors["model.language_model.layers.0.linear_attn.A_log"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing tensor: model\.layers\.0\.linear_attn\.A_log$"):
        load_model(copy)
    assert expected.isfinite().all()
