"""Decode workers load by shard: a follower only its experts, the leader all but the other shards' experts;
the same weights as slicing the loaded model, and nothing else read."""

import pytest
import torch

from krasis.common.model_loader import load_model
from krasis.common.quant.plan import QuantPlan
from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader
from krasis.cpu_worker.expert_shard import ExpertShard
from krasis.cpu_worker.shard_weights import load_expert_shards, load_leader_model, moe_parents
from tests.models.tiny_checkpoints import build_checkpoint

NUM_SHARDS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint("qwen3_moe-base", tmp_path_factory.mktemp("shard-weights") / "tiny-qwen3-moe")


def weights_of(shard: ExpertShard) -> list[torch.Tensor]:
    if shard.quantized:
        return [shard.gate_up.qweight, shard.gate_up.scales, shard.down.qweight, shard.down.scales]
    return [shard.gate_up, shard.down]


@pytest.mark.parametrize("quant", ["none", "q8:g32"])
def test_each_shard_equals_the_loaded_models_slice(model_dir, tmp_path, quant):
    plan = QuantPlan.parse(quant)
    model = load_model(model_dir, torch.float32, quant=plan, cache_root=tmp_path)
    for index in range(NUM_SHARDS):
        loaded = load_expert_shards(model_dir, index, NUM_SHARDS, torch.float32, plan, cache_root=tmp_path)
        sliced = [ExpertShard(p.experts, index, NUM_SHARDS) for p in moe_parents(model)]
        assert len(loaded) == len(sliced) > 0
        for own, reference in zip(loaded, sliced):
            assert (own.start, own.stop, own.num_experts) == (reference.start, reference.stop, reference.num_experts)
            assert all(torch.equal(a, b) for a, b in zip(weights_of(own), weights_of(reference)))


def test_only_the_shards_expert_tensors_are_read(model_dir, monkeypatch):
    read = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: read.append(name) or original(self, name))
    shards = load_expert_shards(model_dir, 1, NUM_SHARDS, torch.float32)
    start, stop = shards[0].start, shards[0].stop
    experts = {int(name.split(".experts.")[1].split(".")[0]) for name in read}
    assert read and all(".experts." in name for name in read) and experts == set(range(start, stop))


def test_a_missing_expert_tensor_is_a_clear_error(model_dir, monkeypatch):
    names = CheckpointReader.names.fget
    dropped = "model.layers.1.mlp.experts.4.down_proj.weight"  # experts 3-5 of 8 are shard 1's
    monkeypatch.setattr(CheckpointReader, "names", property(lambda self: [n for n in names(self) if n != dropped]))
    with pytest.raises(CheckpointError, match="experts.4.down_proj.weight"):
        load_expert_shards(model_dir, 1, NUM_SHARDS, torch.float32)


@pytest.mark.parametrize("quant", ["none", "q8:g32"])
def test_the_leader_holds_the_model_less_other_shards_and_equals_the_loaded_model(model_dir, tmp_path, quant,
                                                                                   monkeypatch):  # fmt: skip
    plan = QuantPlan.parse(quant)
    full = load_model(model_dir, torch.float32, quant=plan, cache_root=tmp_path)
    read = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: read.append(name) or original(self, name))
    model, parents, shards = load_leader_model(model_dir, NUM_SHARDS, torch.float32, plan, cache_root=tmp_path)
    reference = [ExpertShard(p.experts, 0, NUM_SHARDS) for p in moe_parents(full)]
    assert len(parents) == len(shards) == len(reference) > 0
    for own, ref in zip(shards, reference):
        assert (own.start, own.stop) == (ref.start, ref.stop) == (0, ref.stop)
        assert all(torch.equal(a, b) for a, b in zip(weights_of(own), weights_of(ref)))
    params = dict(full.named_parameters())
    assert not any(".experts." in name for name, _ in model.named_parameters())
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    if quant == "none":  # from the checkpoint: no other shard's expert tensor is ever read
        experts = {int(name.split(".experts.")[1].split(".")[0]) for name in read if ".experts." in name}
        assert experts == set(range(reference[0].start, reference[0].stop))
