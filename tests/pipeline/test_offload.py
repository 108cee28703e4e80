"""Weights offloaded by accelerate: the design card's own path, ``from_pretrained(path, quantization_config=cfg,
device_map=..., offload_folder=...)`` with blocks (and the head) on ``"disk"``, compresses to the same weights as a
model in memory, writes them back to the offload folder (never to the source checkpoint), saves block by block
with one block materialised, and reloads; ``cpu_offload`` (a CPU dict store) works the same; a disk offload with
nowhere to write is refused before any work; the damage streams of the schedule spill to disk."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import optimum_sparsesched as osp
from conftest import SMALL, UNIFORM, tiny_model
from optimum_sparsesched.pipeline.offload import has_offloaded_weights, offloaded_tensors
from optimum_sparsesched.pipeline.spill import TensorLists
from optimum_sparsesched.publish import writer as export

accelerate = pytest.importorskip("accelerate")

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
              "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk"}
OPTIONS = dict(sparsity=0.6, bits=4, group_size=32, **SMALL)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def full_state(model):
    """The model's state dict with offloaded tensors read from their weights maps."""
    entries = offloaded_tensors(model)
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if value.device.type == "meta":
            owner, _, attr = key.rpartition(".")
            entry = entries[(id(model.get_submodule(owner)), attr)]
            value = entry.hook.weights_map[entry.name]
        state[key] = value.detach()
    return state


@pytest.fixture
def source(tmp_path, tokenizer):
    path = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(path, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    return path


def test_disk_offloaded_from_pretrained_compresses_like_memory_and_saves_block_by_block(source, tmp_path,
                                                                                         monkeypatch):
    before = digest(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=osp.SparseScheduleConfig(**OPTIONS),
                                                 device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=osp.SparseScheduleConfig(**OPTIONS))
    assert has_offloaded_weights(model) and model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    ours, theirs = full_state(model), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ids = torch.randint(1, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)  # accelerate's hooks, as usual
    assert digest(source) == before  # compressed weights went to the offload folder, not into the checkpoint
    written = {p.name for p in (tmp_path / "offload").glob("*.dat")}
    assert written == {f"{n}.weight.dat" for n in model.config.quantization_config.results.layer_sparsities
                       if ".layers.0." not in n}

    materialised = []
    real_add = export.ShardWriter.add

    def add(self, tensors):  # at every write, at most one decoder block holds real weights
        materialised.append(sum(not has_offloaded_weights(b) for b in model.model.layers[1:]))
        return real_add(self, tensors)

    monkeypatch.setattr(export.ShardWriter, "add", add)
    model.save_pretrained(tmp_path / "saved", max_shard_size="50KB")
    reference.save_pretrained(tmp_path / "reference")
    assert materialised and max(materialised) <= 1
    saved, expected = (load_file_all(tmp_path / f) for f in ("saved", "reference"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert (json.loads((tmp_path / "saved" / "config.json").read_text())
            == json.loads((tmp_path / "reference" / "config.json").read_text()))
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file() and (tmp_path / "saved" / "README.md").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def load_file_all(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_cpu_offload_dict_store_compresses_like_memory(tokenizer):
    reference = tiny_model("llama")
    osp.compress(reference, osp.SparseScheduleConfig(**OPTIONS), tokenizer=tokenizer)
    model = tiny_model("llama")
    accelerate.cpu_offload(model, execution_device="cpu")
    assert has_offloaded_weights(model)
    osp.compress(model, osp.SparseScheduleConfig(**OPTIONS), tokenizer=tokenizer)
    ours = full_state(model)
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())


def test_disk_offload_with_nowhere_to_write_is_refused_before_any_work(source, monkeypatch):
    from optimum_sparsesched import sequential

    def no_calibration(*a, **k):
        raise AssertionError("must fail before calibration")

    monkeypatch.setattr(sequential, "calibration_windows", no_calibration)
    before = digest(source)
    with pytest.raises(ValueError, match=r"offload_folder: parameter 'model\.layers\.1\..*from_pretrained\(.*"
                                         r"offload_folder=FOLDER\)"):
        AutoModelForCausalLM.from_pretrained(source, quantization_config=osp.SparseScheduleConfig(**UNIFORM),
                                             device_map=DEVICE_MAP)
    assert digest(source) == before


def test_meta_weights_without_an_offload_hook_are_refused(tokenizer):
    model = tiny_model("llama")
    model.model.layers[1].to("meta")
    with pytest.raises(ValueError, match=r"model\.layers\.1\..* meta device and no accelerate offload hook"):
        osp.compress(model, osp.SparseScheduleConfig(**UNIFORM), tokenizer=tokenizer)


def test_spilled_tensor_lists_round_trip_and_clean_up():
    values = [[torch.randn(2, 3, dtype=torch.bfloat16), torch.arange(4)], [torch.ones(1)]]
    with TensorLists(spill=True) as lists:
        folder = lists._folder
        for v in values:
            lists.append(v)
        lists[0] = [t * 2 for t in values[0]]
        assert len(lists) == 2 and len(list(folder.iterdir())) == 2
        assert all(torch.equal(a, b * 2) and a.dtype == b.dtype for a, b in zip(lists[0], values[0]))
        assert torch.equal(lists[1][0], values[1][0])
    assert not folder.exists()


def test_offloaded_search_and_resume_with_the_head_on_disk(source, tmp_path):
    """issue 14's allocation search and solver on offloaded blocks, with checkpoint_dir: the resume digests read the
    offloaded blocks and the head (on disk) through their weights maps; same weights as the model in memory."""
    options = dict(sparsity=0.6, preset="quality", search_steps=2, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=osp.SparseScheduleConfig(**options, checkpoint_dir=str(tmp_path / "ckpt")),
        device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=osp.SparseScheduleConfig(**options))
    results, expected = model.config.quantization_config.results, reference.config.quantization_config.results
    assert results.search == expected.search and results.search["steps"] == 2
    assert results.layer_sparsities == expected.layer_sparsities
    ours, theirs = full_state(model), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["finished_blocks"] == 3 and len(manifest["weights"]["blocks"]) == 3
