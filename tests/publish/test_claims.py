"""The card and config.json describe the weights that are saved: sparsities and the N:M pattern are measured on the
tensors written, a module changed after compression is named in a warning, and a folder whose card, config.json and
weights come from different saves is refused for publishing."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import UNIFORM, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.publish.hub import check_folder_agrees, check_checkpoint_folder


def saved_results(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["results"]


def test_weights_changed_after_compression_are_what_the_card_and_config_say(tokenizer, tmp_path, caplog):
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, **UNIFORM), tokenizer=tokenizer)
    changed = [n for n in model.config.quantization_config.results.layer_sparsities if n.endswith(("q_proj", "o_proj"))]
    with torch.no_grad():
        for name in changed:
            model.get_submodule(name).weight.add_(1e-3)  # no zero left
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(tmp_path / "out")
    for name in changed:
        assert f"{name} holds 0.0000 zeros, but the run recorded 0.5" in caplog.text
    results = saved_results(tmp_path / "out")
    assert all(results["layer_sparsities"][n] == 0.0 for n in changed)
    assert results["measured"]["sparsity"] < 0.45 and results["measured"]["pattern"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{results['measured']['sparsity']:.0%} sparse" in card and "50% sparse" not in card


def test_a_pattern_the_weights_do_not_have_is_not_claimed(tokenizer, tmp_path, caplog):
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, **UNIFORM), tokenizer=tokenizer)
    model.config.quantization_config.pattern = "2:4"  # a config edited after the run (unstructured weights)
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(tmp_path / "out")
    assert "do not all have the 2:4 pattern" in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "(2:4)" not in card and "- 2:4" not in card and "unstructured" in card
    assert saved_results(tmp_path / "out")["measured"]["pattern"] is None


def test_a_real_pattern_is_measured_and_claimed(tokenizer, tmp_path):
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, pattern="2:4", **UNIFORM),
                     tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "out")
    assert saved_results(tmp_path / "out")["measured"] == {"sparsity": pytest.approx(0.5, abs=0.01), "pattern": "2:4"}
    assert "(2:4)" in (tmp_path / "out" / "README.md").read_text()


def test_a_folder_mixing_two_saves_is_refused_for_publishing(tokenizer, tmp_path):
    for name, sparsity in (("a", 0.5), ("b", 0.6)):
        model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=sparsity, **UNIFORM), tokenizer=tokenizer)
        model.save_pretrained(tmp_path / name)
    check_folder_agrees(tmp_path / "a", check_checkpoint_folder(tmp_path / "a"))  # a whole save agrees
    shutil.copy(tmp_path / "b" / "README.md", tmp_path / "a" / "README.md")  # a save killed after the card went in
    with pytest.raises(ValueError, match="README.md describes another save than config.json"):
        check_folder_agrees(tmp_path / "a", check_checkpoint_folder(tmp_path / "a"))
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="describes another save than config.json"):
        check_folder_agrees(tmp_path / "a", check_checkpoint_folder(tmp_path / "a"))
