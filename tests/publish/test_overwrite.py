"""One rule for every writer of a checkpoint (``save_pretrained`` of a compressed model, ``compress_checkpoint``, the
CLI): a folder holding a model this package did not write, or the folder the model was compressed from, is never
overwritten unless the caller says ``overwrite=True`` (CLI: ``--overwrite``); refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, UNIFORM, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress, compress_checkpoint
from optimum_sparsesched.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def config() -> SparseScheduleConfig:
    return SparseScheduleConfig(sparsity=0.5, **UNIFORM)


def same_weights(folder: Path, model) -> bool:
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    return all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_save_into_the_folder_the_model_was_compressed_from_is_refused(save_tiny):
    """``from_pretrained("c2", quantization_config=cfg).save_pretrained("c2")`` would replace the user's dense
    weights; so would ``compress(from_pretrained("c2")).save_pretrained("c2")``."""
    source = save_tiny("llama")
    before = snapshot(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config())
    with pytest.raises(ValueError, match="save_directory: .* is the folder the model was loaded from.*overwrite=True"):
        model.save_pretrained(source)
    loaded = AutoModelForCausalLM.from_pretrained(source)
    compress(loaded, config())
    with pytest.raises(ValueError, match="save_directory: .*overwrite=True"):
        loaded.save_pretrained(source)
    assert snapshot(source) == before
    model.save_pretrained(source, overwrite=True)  # said explicitly: replaced
    assert same_weights(source, model)


@pytest.mark.parametrize("layout", ["transformers save", "weights without config.json"])
def test_save_into_a_folder_holding_another_model_is_refused(layout, tmp_path, tokenizer):
    model = compress(tiny_model("llama", seed=1), config(), tokenizer=tokenizer)
    out = tmp_path / "other"
    if layout == "transformers save":
        tiny_model("llama", seed=5).save_pretrained(out)
        named = "config.json, model.safetensors"
    else:
        out.mkdir()
        save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"))
        named = "model.safetensors"
    before = snapshot(out)
    with pytest.raises(ValueError, match=f"save_directory: .* holds a model this package did not write \\({named}\\)"):
        model.save_pretrained(out)
    with pytest.raises(ValueError, match="overwrite: 'yes' is not valid"):
        model.save_pretrained(out, overwrite="yes")
    assert snapshot(out) == before
    model.save_pretrained(out, overwrite=True)
    assert same_weights(out, model)


def test_a_checkpoint_of_ours_is_replaced_without_asking(tmp_path, tokenizer):
    out = tmp_path / "ours"
    compress(tiny_model("llama", seed=1), config(), tokenizer=tokenizer).save_pretrained(out)
    newer = compress(tiny_model("llama", seed=2), config(), tokenizer=tokenizer)
    newer.save_pretrained(out)
    assert same_weights(out, newer)


def test_compress_checkpoint_refuses_another_models_folder_and_its_source(save_tiny, tmp_path):
    source = save_tiny("llama")
    other = save_tiny("llama", seed=7)
    for out, needle in ((other, "holds a model this package did not write"),
                        (source, "is the folder the model was loaded from")):
        before = snapshot(out)
        with pytest.raises(ValueError, match=f"^out: .*{needle}.*overwrite=True"):
            compress_checkpoint(source, out, config())
        assert snapshot(out) == before
    compress_checkpoint(source, other, config(), overwrite=True)
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=config())
    assert same_weights(other, reference)
    compress_checkpoint(source, source, config(), overwrite=True)  # read to the end, then renamed in
    assert same_weights(source, reference)


def test_the_cli_applies_the_same_rule_with_overwrite(save_tiny, tmp_path, capsys):
    source = save_tiny("llama")
    other = save_tiny("llama", seed=7)
    before = snapshot(other)
    options = ["--schedule", "uniform", "--dataset", str(CALIBRATION_TEXT), "--num-samples", "2", "--seq-len", "32"]
    capsys.readouterr()
    for out in (other, source):
        assert main(["compress", str(source), str(out), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: OUT: ") and "--overwrite" in err and "\n" not in err, err
    assert snapshot(other) == before
    assert main(["compress", str(source), str(other), "--overwrite", *options]) == 0
    assert (AutoModelForCausalLM.from_pretrained(other).config.quantization_config.results.compressed)
