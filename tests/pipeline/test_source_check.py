"""The one check of the source before any work, through every entry point: ``from_pretrained(...,
quantization_config=...)``, ``compress()``, ``compress_checkpoint`` and the CLI (``compress MODEL OUT`` streamed, and
in memory with an evaluation text). A causal LM with its own head, every tensor read from the checkpoint, every
weight finite, every weight file whole; else one clear error (CLI: ``error: ...``, exit 2) and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, UNIFORM, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress, compress_checkpoint
from optimum_sparsesched.cli import main

EVAL = str(Path(CALIBRATION_TEXT).with_name("evaluation.txt"))


def config(**options) -> SparseScheduleConfig:
    return SparseScheduleConfig(sparsity=0.5, **{**UNIFORM, **options})


def cli(source: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", str(source), str(out), "--schedule", "uniform", "--dataset", str(CALIBRATION_TEXT),
            "--num-samples", "2", "--seq-len", "32", *extra]


#: the in-memory path of the CLI (an evaluation text asks for measurements before and after)
IN_MEMORY = ("--eval-text", EVAL, "--eval-seq-len", "32", "--eval-windows", "1")


def refused_everywhere(source: Path, tmp_path: Path, capsys, *needles: str) -> None:
    """Every entry point refuses ``source`` naming ``needles``, and writes nothing."""
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_pretrained(source, quantization_config=config())
    assert all(n in str(err.value) for n in needles), err.value
    with pytest.raises(ValueError) as err:
        compress_checkpoint(source, tmp_path / "streamed", config())
    assert str(err.value).startswith("src: ") and all(n in str(err.value) for n in needles), err.value
    for k, extra in enumerate(((), IN_MEMORY)):
        out = tmp_path / f"cli-{k}"
        assert main(cli(source, out, *extra)) == 2
        err_text = capsys.readouterr().err.strip()
        last = err_text.splitlines()[-1]
        assert last.startswith("error: model: ") and err_text.count("error:") == 1 and "Traceback" not in err_text
        assert all(n in last for n in needles), last
        assert not out.exists()
    assert not (tmp_path / "streamed").exists()


def edit_weights(folder: Path, edit) -> None:
    """Apply ``edit(state_dict)`` to the single ``model.safetensors`` of ``folder``."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("family,dropped", [
    ("llama", ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]),
    ("gpt2", ["transformer.h.1.mlp.c_fc.weight"]),
    ("opt", ["model.decoder.layers.0.self_attn.k_proj.bias"])])
def test_a_checkpoint_lacking_tensors_is_refused_by_every_entry_point(family, dropped, save_tiny, tmp_path, capsys):
    """transformers fills what the checkpoint lacks with random values (its load report says MISSING and the load
    goes on): those would be compressed and saved as the user's weights."""
    source = save_tiny(family, tie_word_embeddings=False) if family == "llama" else save_tiny(family)
    edit_weights(source, lambda state: [state.pop(k) for k in dropped])
    refused_everywhere(source, tmp_path, capsys, *dropped)
    loaded = AutoModelForCausalLM.from_pretrained(source)  # loaded by the user: compress() refuses it too
    with pytest.raises(ValueError, match="not in .*" + dropped[0].replace(".", r"\.")):
        compress(loaded, config())


def test_a_model_built_from_a_config_reads_nothing_and_is_accepted(tokenizer):
    model = tiny_model("llama")  # no checkpoint: nothing can be missing from one
    compress(model, config(), tokenizer=tokenizer)
    assert model.config.quantization_config.results.compressed


@pytest.mark.parametrize("kind", ["bert", "llama-base", "llama-classifier"])
def test_a_checkpoint_without_its_language_model_head_is_refused(kind, tmp_path, tokenizer, capsys):
    """A ``BertModel`` (or a base ``LlamaModel``, or a classifier) is not a causal LM with its head:
    ``AutoModelForCausalLM`` would build one around it with a random head (BertLMHeadModel)."""
    source = tmp_path / kind
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=128))
        saved = "BertModel"
    elif kind == "llama-base":
        model = transformers.LlamaModel(tiny_model("llama").config)
        saved = "LlamaModel"
    else:
        cfg = tiny_model("llama").config
        cfg.num_labels = 3
        model = transformers.LlamaForSequenceClassification(cfg)
        saved = "LlamaForSequenceClassification"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    refused_everywhere(source, tmp_path, capsys, saved, "not a causal language model")
    with pytest.raises(ValueError, match="BertModel is not a causal language model"):
        compress(transformers.BertModel(transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=128)),
                 config())


def test_an_encoder_decoder_is_refused_in_one_line(tmp_path, tokenizer, capsys):
    source = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=512, d_model=64, d_ff=128, num_layers=1,
                                                                  num_heads=4, d_kv=16)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    with pytest.raises(ValueError, match="src: a T5Config .* is an encoder-decoder model; supported: decoder-only"):
        compress_checkpoint(source, tmp_path / "out", config())
    for extra in ((), IN_MEMORY):
        capsys.readouterr()
        assert main(cli(source, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: model: a T5Config"), err  # not 200 class names
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tensor,options", [
    ("lm_head.weight", {"schedule": "hessian"}),  # the schedule's damage would be NaN: a silent uniform allocation
    ("model.layers.1.mlp.down_proj.weight", {})])  # the OBS solve would fail without naming a module
def test_a_non_finite_source_weight_is_refused_naming_it(tensor, options, save_tiny, tmp_path, capsys):
    source = save_tiny("llama", tie_word_embeddings=False)

    def poison(state):
        state[tensor][1, 2] = float("nan")
        state[tensor][0, 0] = float("inf")

    edit_weights(source, poison)
    refused_everywhere(source, tmp_path, capsys, tensor, "1 NaN and 1 Inf")
    model = AutoModelForCausalLM.from_pretrained(source)
    with pytest.raises(ValueError, match=tensor.replace(".", r"\.") + " holds 1 NaN and 1 Inf"):
        compress(model, config(**options))


def test_the_block_loop_names_what_a_non_finite_model_breaks(tokenizer):
    """Past the source check (the block loop called directly): a NaN head stops the schedule's damage measurement
    instead of turning it into a uniform allocation, and a failed OBS solve names its module."""
    from optimum_sparsesched.sequential import compress_blocks

    model = tiny_model("llama", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="schedule: the (KL|estimated) damage of (block|every block)"):
        compress_blocks(model, config(schedule="hessian"), tokenizer)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.mlp\.down_proj: OBS pruning produced"):
        compress_blocks(model, config(), tokenizer)


def damaged(kind: str, folder: Path) -> str:
    """Damage the checkpoint in ``folder`` (a sharded one, except for "empty"); returns what the error names."""
    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("model-*.safetensors"))
    if kind == "missing shard":
        shards[1].unlink()
        return shards[1].name
    if kind == "index names a missing file":
        data = json.loads(index.read_text())
        data["weight_map"][next(iter(data["weight_map"]))] = "model-00099-of-00099.safetensors"
        index.write_text(json.dumps(data))
        return "model-00099-of-00099.safetensors"
    if kind == "index not JSON":
        index.write_text('{"weight_map": ')
        return "model.safetensors.index.json is not a valid JSON index"
    if kind == "truncated shard":
        data = shards[2].read_bytes()
        shards[2].write_bytes(data[: len(data) - 100])
        return f"{shards[2].name} is truncated"
    if kind == "cut inside the header":
        shards[0].write_bytes(shards[0].read_bytes()[:20])
        return f"{shards[0].name} is not a complete safetensors file"
    if kind == "empty model.safetensors":
        for p in [index, *shards]:
            p.unlink()
        (folder / "model.safetensors").write_bytes(b"")
        return "model.safetensors is empty"
    if kind == "invalid config.json":
        (folder / "config.json").write_text("{\"model_type\": \"llama\",")
        return "config.json is not valid JSON"
    if kind == "config.json of other shapes":
        data = json.loads((folder / "config.json").read_text())
        data["intermediate_size"] = 96
        (folder / "config.json").write_text(json.dumps(data))
        return "has shape [128, 64], but its config.json describes [96, 64]"
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "index names a missing file", "index not JSON", "truncated shard",
                                  "cut inside the header", "empty model.safetensors", "invalid config.json",
                                  "config.json of other shapes"])
def test_a_damaged_checkpoint_is_refused_before_loading(kind, tmp_path, tokenizer, capsys):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source, max_shard_size="60KB")
    tokenizer.save_pretrained(source)
    named = damaged(kind, source)
    with pytest.raises(ValueError, match="^src: ") as err:
        compress_checkpoint(source, tmp_path / "out", config())
    assert named in str(err.value), err.value
    capsys.readouterr()
    assert main(cli(source, tmp_path / "out")) == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.count("\n") == 0 and err_text.startswith("error: model: ") and named in err_text, err_text
    if kind != "invalid config.json":  # transformers reads config.json itself before any quantizer hook
        with pytest.raises((ValueError, OSError)) as err:
            AutoModelForCausalLM.from_pretrained(source, quantization_config=config())
        assert named in str(err.value) or kind.startswith("index"), err.value
    assert not (tmp_path / "out").exists()


def test_a_damaged_source_leaves_an_existing_output_folder_as_it_was(tmp_path, tokenizer):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (source / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated"):
        compress_checkpoint(source, out, config())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    shutil.rmtree(source)
