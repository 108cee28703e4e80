"""ShardWriter: safetensors shards written one tensor at a time, read back by safetensors itself (every dtype,
0-d and empty tensors, metadata), sharded by size with transformers' names and index, every tensor aligned to its
element size, and nothing left behind by a discarded write."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from optimum_sparsesched.publish.shards import ShardWriter

TENSORS = {
    "a.weight": torch.randn(3, 5).to(torch.bfloat16),
    "a.weight_mask": torch.randint(0, 255, (3, 1), dtype=torch.uint8),
    "b.count": torch.tensor(7, dtype=torch.int64),
    "b.weight": torch.randn(4, 4),
    "c.empty": torch.zeros(0),
    "c.flags": torch.tensor([True, False, True]),
    "c.half": torch.randn(5).half(),
    "c.codes": torch.randint(-8, 8, (9,), dtype=torch.int32),
}


def read_folder(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_one_shard_round_trips_every_dtype(tmp_path):
    writer = ShardWriter(tmp_path, metadata={"sparse_schedule_format": "compact"})
    writer.add(dict(list(TENSORS.items())[:3]))
    writer.add(dict(list(TENSORS.items())[3:]))
    assert writer.finish() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    got = read_folder(tmp_path)
    assert got.keys() == TENSORS.keys()
    assert all(got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
               for k, v in TENSORS.items())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"sparse_schedule_format": "compact", "format": "pt"}


def test_shards_by_size_with_index_and_aligned_tensors(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=70)
    writer.add(TENSORS)
    names = writer.finish(total_parameters=123)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 2 and names[-1] == "model.safetensors.index.json"
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 123,
                                 "total_size": sum(t.numel() * t.element_size() for t in TENSORS.values())}
    assert set(index["weight_map"]) == set(TENSORS) and set(index["weight_map"].values()) == set(shards)
    got = read_folder(tmp_path)
    assert all(torch.equal(got[k], v) for k, v in TENSORS.items())
    for shard in shards:
        raw = (tmp_path / shard).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert (8 + length) % 8 == 0  # the data starts aligned
        header = json.loads(raw[8:8 + length])
        header.pop("__metadata__")
        for name, entry in header.items():
            assert entry["data_offsets"][0] % TENSORS[name].element_size() == 0, name
            assert sum(t.numel() * t.element_size() for n, t in TENSORS.items() if n in header) <= max(
                70, max(TENSORS[n].numel() * TENSORS[n].element_size() for n in header))


def test_discard_leaves_nothing_and_bad_sizes_are_refused(tmp_path):
    writer = ShardWriter(tmp_path / "out", max_shard_size=40)
    writer.add(TENSORS)
    writer.discard()
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(ValueError, match="max_shard_size"):
        ShardWriter(tmp_path, max_shard_size="big")
    writer = ShardWriter(tmp_path / "dup")
    with pytest.raises(ValueError, match="written twice"):
        writer.add({"x": torch.ones(1)})
        writer.add({"x": torch.ones(1)})
