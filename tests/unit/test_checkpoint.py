"""CheckpointReader reads HF safetensors checkpoints back exactly and names every bad file."""

import json
import struct
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from krasis.common.weights.checkpoint import INDEX_FILE, CheckpointError, CheckpointReader
from krasis.common.weights.checkpoint_writer import save_sharded


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.experts.0.down_proj.weight": torch.randn(8, 4, generator=g).to(
            torch.float8_e4m3fn
        ),
        "model.layers.0.mlp.experts.0.down_proj.weight_scale": torch.rand(8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).to(torch.float16),
        "q.int8": torch.randint(-128, 128, (6,), generator=g, dtype=torch.int8),
        "q.uint8": torch.randint(0, 256, (3, 2), generator=g, dtype=torch.uint8),
        "q.int32": torch.randint(-(2**31), 2**31 - 1, (5,), generator=g, dtype=torch.int32),
        "q.int64": torch.randint(-(2**40), 2**40, (4,), generator=g, dtype=torch.int64),
        "mask": torch.rand(7, generator=g) > 0.5,
    }


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    # Compare raw bytes: torch.equal does not cover fp8, and bytes are what must survive.
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


def write_raw(path: Path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def f32_entry(begin: int, numel: int = 1) -> dict:
    return {"dtype": "F32", "shape": [numel], "data_offsets": [begin, begin + 4 * numel]}


def assert_clear_error(model_dir: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as excinfo:
        CheckpointReader(model_dir)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def write_three_shards(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {f"layer.{i}.weight": torch.full((4,), float(i)) for i in range(3)}
    save_sharded(tensors, model_dir, max_shard_bytes=16)
    return tensors


def edit_index(model_dir: Path, edit) -> None:
    index_path = model_dir / INDEX_FILE
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


# --- reading back ---------------------------------------------------------------------------


def test_single_file_checkpoint_reads_back_identical_tensors(tmp_path):
    tensors = sample_tensors()
    assert save_sharded(tensors, tmp_path) == [tmp_path / "model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names) == sorted(tensors)
    for name, expected in tensors.items():
        assert reader.shape(name) == tuple(expected.shape)
        assert reader.dtype(name) == expected.dtype
        assert_identical(reader.get(name), expected)


def test_sharded_checkpoint_writes_hf_index_and_reads_back_identical_tensors(tmp_path):
    tensors = sample_tensors()
    files = save_sharded(tensors, tmp_path, max_shard_bytes=128)
    assert len(files) > 2
    assert [f.name for f in files] == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    reader = CheckpointReader(tmp_path)
    assert reader.files == files
    for name, expected in tensors.items():
        assert_identical(reader.get(name), expected)


def test_iteration_streams_every_tensor_shard_by_shard_in_names_order(tmp_path):
    tensors = sample_tensors()
    save_sharded(tensors, tmp_path, max_shard_bytes=128)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    reader = CheckpointReader(tmp_path)
    streamed = list(reader)
    assert [name for name, _ in streamed] == reader.names
    assert sorted(reader.names) == sorted(tensors)
    shard_of_each = [weight_map[name] for name in reader.names]
    assert shard_of_each == sorted(shard_of_each)
    for name, tensor in streamed:
        assert_identical(tensor, tensors[name])


def test_iteration_releases_each_tensor_before_loading_the_next(tmp_path):
    save_sharded(sample_tensors(), tmp_path, max_shard_bytes=128)
    reader = CheckpointReader(tmp_path)
    load, previous, loads = reader.get, [], []

    def checked_get(name):
        # The caller has dropped the last tensor, so nothing else may still hold it.
        loads.append(not previous or previous[-1]() is None)
        return load(name)

    reader.get = checked_get
    for _, tensor in reader:
        previous.append(weakref.ref(tensor))
        del tensor
    assert loads == [True] * len(reader)


def test_names_within_a_file_follow_data_order_not_header_order(tmp_path):
    write_raw(tmp_path / "model.safetensors",
              {"a": f32_entry(4), "b": f32_entry(0)}, struct.pack("<2f", 1.5, 2.5))
    reader = CheckpointReader(tmp_path)
    assert reader.names == ["b", "a"]
    assert reader.get("a").item() == 2.5
    assert [name for name, _ in reader] == ["b", "a"]


def test_without_index_every_safetensors_file_is_read_in_sorted_order(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "b.safetensors")
    save_file({"y": torch.ones(2)}, tmp_path / "a.safetensors")
    assert CheckpointReader(tmp_path).names == ["y", "x"]


def test_model_safetensors_is_read_alone_when_there_is_no_index(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    save_file({"y": torch.ones(2)}, tmp_path / "extra.safetensors")
    assert CheckpointReader(tmp_path).names == ["x"]


def test_index_decides_which_files_are_read(tmp_path):
    tensors = write_three_shards(tmp_path)
    save_file({"stray": torch.ones(2)}, tmp_path / "consolidated.safetensors")
    assert sorted(CheckpointReader(tmp_path).names) == sorted(tensors)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_get_maps_the_file_instead_of_reading_it_into_the_heap(tmp_path):
    save_sharded({"w": torch.randn(1 << 16)}, tmp_path)
    tensor = CheckpointReader(tmp_path).get("w")
    mapped = [line.split()[0] for line in open("/proc/self/maps") if "model.safetensors" in line]
    spans = [tuple(int(x, 16) for x in span.split("-")) for span in mapped]
    assert any(lo <= tensor.data_ptr() < hi for lo, hi in spans)


def test_unknown_tensor_name_is_a_clear_error(tmp_path):
    save_sharded({"w": torch.zeros(2)}, tmp_path)
    reader = CheckpointReader(tmp_path)
    assert "w" in reader and "nope" not in reader
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        reader.get("nope")
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        reader.shape("nope")


# --- writing --------------------------------------------------------------------------------


def test_save_sharded_gives_an_oversized_tensor_its_own_shard(tmp_path):
    tensors = {"a": torch.zeros(10), "big": torch.zeros(100), "c": torch.zeros(10)}
    save_sharded(tensors, tmp_path, max_shard_bytes=100)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3


def test_save_sharded_writes_tied_tensors_as_separate_copies(tmp_path):
    embed = torch.randn(4, 2)
    save_sharded({"embed.weight": embed, "lm_head.weight": embed}, tmp_path)
    reader = CheckpointReader(tmp_path)
    assert_identical(reader.get("lm_head.weight"), embed)
    assert_identical(reader.get("embed.weight"), embed)


def test_save_sharded_refuses_a_directory_that_already_holds_a_checkpoint(tmp_path):
    save_sharded({"w": torch.zeros(2)}, tmp_path)
    with pytest.raises(FileExistsError, match="already holds"):
        save_sharded({"w": torch.ones(2)}, tmp_path)


# --- errors ---------------------------------------------------------------------------------


def test_directory_without_safetensors_says_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_clear_error(tmp_path, str(tmp_path), INDEX_FILE, "model.safetensors", "*.safetensors")


def test_missing_directory_is_a_clear_error(tmp_path):
    assert_clear_error(tmp_path / "absent", "absent", "not a directory")


def test_index_naming_a_missing_shard_is_a_clear_error(tmp_path):
    write_three_shards(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    assert_clear_error(tmp_path, INDEX_FILE, "model-00002-of-00003.safetensors", "missing")


def test_tensor_listed_in_index_but_absent_from_its_shard_names_both(tmp_path):
    write_three_shards(tmp_path)
    edit_index(tmp_path, lambda wm: wm.update({"ghost.weight": "model-00001-of-00003.safetensors"}))
    assert_clear_error(tmp_path, "'ghost.weight'", "model-00001-of-00003.safetensors")


def test_index_placing_a_tensor_in_the_wrong_shard_names_both(tmp_path):
    write_three_shards(tmp_path)
    shard_3 = "model-00003-of-00003.safetensors"
    edit_index(tmp_path, lambda wm: wm.update({"layer.0.weight": shard_3}))
    assert_clear_error(tmp_path, "'layer.0.weight'", shard_3)


def test_shard_tensor_missing_from_index_is_a_clear_error(tmp_path):
    save_sharded({"a": torch.zeros(4), "b": torch.zeros(4), "c": torch.zeros(4)}, tmp_path, 32)
    edit_index(tmp_path, lambda wm: wm.pop("b"))
    assert_clear_error(tmp_path, "does not list", "'b'", "model-00001-of-00002")


def test_same_tensor_in_two_files_names_both(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    assert_clear_error(tmp_path, "'w'", "two shards", "a.safetensors", "b.safetensors")


def test_same_tensor_in_two_indexed_shards_names_both(tmp_path):
    write_three_shards(tmp_path)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    save_file({"layer.2.weight": torch.zeros(4), "layer.0.weight": torch.zeros(4)},
              tmp_path / "model-00003-of-00003.safetensors")
    assert_clear_error(tmp_path, "'layer.0.weight'", "two shards", "00001-of", "00003-of")


def test_corrupt_index_json_is_a_clear_error(tmp_path):
    write_three_shards(tmp_path)
    (tmp_path / INDEX_FILE).write_text('{"weight_map": ')
    assert_clear_error(tmp_path, INDEX_FILE, "corrupt index")


@pytest.mark.parametrize("raw", [
    pytest.param(b"\x10\x00", id="shorter_than_length_prefix"),
    pytest.param(struct.pack("<Q", 1 << 40) + b"{}", id="length_past_end_of_file"),
    pytest.param(struct.pack("<Q", 9) + b"{not json", id="invalid_json"),
    pytest.param(struct.pack("<Q", 2) + b"\xff\xfe", id="not_utf8"),
    pytest.param(struct.pack("<Q", 2) + b"[]", id="json_not_an_object"),
])
def test_corrupt_header_bytes_are_a_clear_error(tmp_path, raw):
    (tmp_path / "model.safetensors").write_bytes(raw)
    assert_clear_error(tmp_path, f"{tmp_path / 'model.safetensors'}: corrupt safetensors header")


@pytest.mark.parametrize("header,data", [
    pytest.param({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, id="no_data_offsets"),
    pytest.param({"w": f32_entry(0, numel=2) | {"shape": [3]}}, b"\0" * 8, id="shape_mismatch"),
    pytest.param({"w": f32_entry(0) | {"shape": [-1]}}, b"\0" * 4, id="negative_dim"),
    pytest.param({"a": f32_entry(0), "b": f32_entry(2)}, b"\0" * 6, id="overlapping_data"),
    pytest.param({"w": f32_entry(0)}, b"\0" * 6, id="bytes_after_last_tensor"),
    pytest.param({"__metadata__": {"format": 1}, "w": f32_entry(0)}, b"\0" * 4, id="bad_metadata"),
])
def test_inconsistent_header_is_a_clear_error(tmp_path, header, data):
    write_raw(tmp_path / "model.safetensors", header, data)
    assert_clear_error(tmp_path, "model.safetensors: corrupt safetensors header")


def test_truncated_file_reports_expected_and_actual_data_size(tmp_path):
    save_sharded({"w": torch.zeros(64)}, tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    assert_clear_error(tmp_path, f"{path}: truncated: header says 256 bytes of data, file has 246")


def test_unsupported_dtype_names_file_tensor_and_dtype(tmp_path):
    header = {"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}
    write_raw(tmp_path / "model.safetensors", header, b"\0" * 8)
    message = assert_clear_error(tmp_path, "model.safetensors", "'w'", "unsupported dtype 'F64'")
    assert "F8_E4M3" in message  # lists what is supported
