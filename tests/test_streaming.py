"""The streaming path, checkpoint to checkpoint with one block in memory (``compress_checkpoint``): bit-identical
to ``from_pretrained(..., quantization_config=cfg).save_pretrained`` on several families, schedules and export
formats, from multi-shard sources; the source is never written; resume; bad input refused before any work with
nothing left on disk; the CLI's ``compress MODEL OUT``; and a memory bound checked in a subprocess on a synthetic
checkpoint of a few hundred MB."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import optimum_sparsesched as osp
import optimum_sparsesched.streaming as streaming
from conftest import CALIBRATION_TEXT, SMALL, UNIFORM, tiny_model
from optimum_sparsesched.cli import main

TESTS = Path(__file__).parent


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_checkpoint(a: Path, b: Path, output_neutral: tuple[str, ...] = ()) -> None:
    """Same tensors (names, dtypes, bits) and the same config.json up to the given output-neutral options."""
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    for key in output_neutral:
        ca["quantization_config"].pop(key, None), cb["quantization_config"].pop(key, None)
    assert ca == cb


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def sharded(tmp_path, tokenizer):
    """A tiny checkpoint saved in several safetensors shards (so blocks are read lazily across files)."""

    def save(family: str, dtype=torch.float32, **overrides) -> Path:
        path = tmp_path / f"src-{family}"
        tiny_model(family, dtype=dtype, **overrides).save_pretrained(path, max_shard_size="60KB")
        tokenizer.save_pretrained(path)
        assert len(list(path.glob("model-*.safetensors"))) > 2
        return path

    return save


CASES = {
    "llama-hessian": ("llama", dict(sparsity=0.6, **SMALL)),
    "opt-int4": ("opt", dict(sparsity=0.5, bits=4, group_size=32, **UNIFORM)),
    "gpt2-conv1d-2of4": ("gpt2", dict(sparsity=0.5, pattern="2:4", **UNIFORM)),
    "gemma3-hessian-dense": ("gemma3", dict(sparsity=0.6, export_format="dense", **SMALL)),
    "llama-int8-compressed-tensors": ("llama", dict(sparsity=0.5, bits=8, group_size=-1, sym=True,
                                                    export_format="compressed-tensors", **UNIFORM)),
    # issue 14's options: the quality preset (ADMM solver) with the allocation search, which visits blocks again
    "llama-quality-preset-search": ("llama", dict(sparsity=0.6, preset="quality", search_steps=2, **SMALL)),
    "opt-refit-2of4-int4": ("opt", dict(sparsity=0.5, pattern="2:4", bits=4, group_size=32, solver="refit",
                                        **UNIFORM)),
    # block reconstruction: a dense stream beside the compressed one (bf16 Llama: float32 master weights), and the
    # local target (the Hessian forward's outputs; the after pass's outputs are the next block's inputs)
    "llama-reconstruct-2of4": ("llama", dict(sparsity=0.5, pattern="2:4", reconstruct_epochs=2, **UNIFORM)),
    "opt-reconstruct-int4-local": ("opt", dict(sparsity=0.5, bits=4, group_size=32, reconstruct_epochs=2,
                                               reconstruct_target="local", **UNIFORM)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory_bit_for_bit(case, sharded, tmp_path):
    family, options = CASES[case]
    if options.get("export_format") == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    src = sharded(family, dtype=torch.bfloat16 if family == "llama" else torch.float32)
    before = digest(src)
    reference = AutoModelForCausalLM.from_pretrained(src, quantization_config=osp.SparseScheduleConfig(**options))
    reference.save_pretrained(tmp_path / "in-memory")
    config = osp.compress_checkpoint(src, tmp_path / "streamed", osp.SparseScheduleConfig(**options),
                                     max_shard_size="40KB")
    out = tmp_path / "streamed"
    assert_same_checkpoint(out, tmp_path / "in-memory")
    assert config.results.layer_sparsities == reference.config.quantization_config.results.layer_sparsities
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert digest(src) == before  # the source checkpoint is only read
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_streamed_checkpoint_reloads_like_the_in_memory_model(sharded, tmp_path):
    src = sharded("llama")
    options = dict(sparsity=0.5, bits=4, group_size=32, **UNIFORM)
    osp.compress_checkpoint(src, tmp_path / "out", options)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = AutoModelForCausalLM.from_pretrained(src, quantization_config=osp.SparseScheduleConfig(**options))
    ids = torch.randint(1, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def kill_at_block_1(monkeypatch):
    """Make the streaming run die (KeyboardInterrupt) when block 1 reaches the output, after it was checkpointed;
    returns the writer's real ``add_block`` to put back."""
    real_sink = streaming.CheckpointWriter.add_block

    def fail_at_block_1(self, visit):
        if visit.index == 1:
            raise KeyboardInterrupt("killed")
        real_sink(self, visit)

    monkeypatch.setattr(streaming.CheckpointWriter, "add_block", fail_at_block_1)
    return real_sink


@pytest.mark.parametrize("reconstruct_epochs", [0, 2])  # 2: the resumed run rebuilds the dense stream
def test_resume_after_a_failure_and_out_untouched_until_complete(reconstruct_epochs, sharded, tmp_path, monkeypatch):
    src = sharded("llama", num_hidden_layers=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"an older checkpoint")
    options = dict(sparsity=0.5, checkpoint_dir=str(tmp_path / "ckpt"), reconstruct_epochs=reconstruct_epochs,
                   **UNIFORM)
    real_sink = kill_at_block_1(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        osp.compress_checkpoint(src, out, options, overwrite=True)  # the older checkpoint is not ours
    assert digest(out) == {"model.safetensors": hashlib.sha256(b"an older checkpoint").hexdigest(),
                           "notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["finished_blocks"] == 2

    monkeypatch.setattr(streaming.CheckpointWriter, "add_block", real_sink)
    osp.compress_checkpoint(src, out, options, overwrite=True)  # resumes at block 2
    osp.compress_checkpoint(src, tmp_path / "uninterrupted", dict(sparsity=0.5, reconstruct_epochs=reconstruct_epochs,
                                                                  **UNIFORM))
    assert_same_checkpoint(out, tmp_path / "uninterrupted", output_neutral=("checkpoint_dir",))
    assert (out / "notes.txt").read_text() == "mine"  # a file of the user's is kept


def test_hessian_schedule_resume_streams_and_checks_every_block(sharded, tmp_path, monkeypatch):
    """The hessian schedule with checkpoint_dir: every block's digest is taken through a visit (the weights are on
    disk), the interrupted run resumes and ends with the uninterrupted run's checkpoint; a source with other weights
    is refused from the same checkpoint_dir."""
    src = sharded("llama", num_hidden_layers=3)
    options = dict(sparsity=0.6, checkpoint_dir=str(tmp_path / "ckpt"), **SMALL)
    real_sink = kill_at_block_1(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        osp.compress_checkpoint(src, tmp_path / "out", options)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["finished_blocks"] == 2 and len(manifest["weights"]["blocks"]) == 3
    assert not (tmp_path / "out").exists()  # made for the run, removed with it
    monkeypatch.setattr(streaming.CheckpointWriter, "add_block", real_sink)
    osp.compress_checkpoint(src, tmp_path / "out", options)
    osp.compress_checkpoint(src, tmp_path / "uninterrupted", dict(sparsity=0.6, **SMALL))
    assert_same_checkpoint(tmp_path / "out", tmp_path / "uninterrupted", output_neutral=("checkpoint_dir",))

    other = tmp_path / "other"  # another fine-tune: the same architecture with block 1 changed
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(other, max_shard_size="60KB")
    for f in src.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="block 1 had other weights"):
        osp.compress_checkpoint(other, tmp_path / "out-other", options)


def test_bad_input_is_refused_before_any_work(sharded, tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("must fail before loading the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    src = sharded("opt")
    (tmp_path / "plain-file").write_text("x")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((src / "config.json").read_text())
    cases = [((tmp_path / "no-weights", tmp_path / "o1", UNIFORM), "src: .*no safetensors weights"),
             ((tmp_path / "plain-file", tmp_path / "o2", UNIFORM), "src: .*is a file"),
             (("/nonexistent/folder", tmp_path / "o3", UNIFORM), "src: .*neither a local folder nor a hub model id"),
             ((src, src, UNIFORM), "out: .*the folder the model was loaded from.*overwrite=True"),
             ((src, tmp_path / "plain-file", UNIFORM), "out: .*is a file"),
             ((src, tmp_path / "o4", {**UNIFORM, "sparsity": 1.5}), "sparsity"),
             ((src, tmp_path / "o6" / "out", {**UNIFORM, "checkpoint_dir": str(tmp_path / "o6")}),
              "overlaps checkpoint_dir")]
    for (s, o, options), match in cases:
        with pytest.raises(ValueError, match=match):
            osp.compress_checkpoint(s, o, options)
    with pytest.raises(ValueError, match="max_shard_size"):
        osp.compress_checkpoint(src, tmp_path / "o5", UNIFORM, max_shard_size="huge")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-weights", "plain-file", "src-opt"]


def test_a_device_budget_too_small_for_one_block_is_refused_before_calibration(sharded, tmp_path, monkeypatch):
    from optimum_sparsesched import sequential

    def no_calibration(*a, **k):
        raise AssertionError("must fail before calibration")

    monkeypatch.setattr(sequential, "calibration_windows", no_calibration)
    with pytest.raises(ValueError, match=r"max_device_memory: 1000000 bytes .* needs \d+ bytes"):
        osp.compress_checkpoint(sharded("llama"), tmp_path / "out", {**UNIFORM, "max_device_memory": "1MB"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-llama"]


def test_cli_compress_model_out_streams(sharded, tmp_path, capsys, monkeypatch):
    src = sharded("llama")
    calls = []
    real = osp.compress_checkpoint
    monkeypatch.setattr(osp, "compress_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    args = ["compress", str(src), str(tmp_path / "out"), "--schedule", "uniform", "--num-samples", "2",
            "--seq-len", "32", "--dataset", str(CALIBRATION_TEXT), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(calls) == 1 and summary["saved"] == str(tmp_path / "out")
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    reference = AutoModelForCausalLM.from_pretrained(src, quantization_config=osp.SparseScheduleConfig(
        sparsity=0.5, schedule="uniform", num_samples=2, seq_len=32, dataset=str(CALIBRATION_TEXT)))
    reference.save_pretrained(tmp_path / "in-memory")
    assert_same_checkpoint(tmp_path / "out", tmp_path / "in-memory")


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from conftest import CALIBRATION_TEXT
    import optimum_sparsesched as osp
    from optimum_sparsesched.pipeline.calibration import calibration_windows, resolve_tokenizer

    def peak():  # VmHWM: this process's peak resident set (ru_maxrss would include the parent's at the fork)
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    cfg = osp.SparseScheduleConfig(sparsity=0.5, schedule="uniform", dataset=str(CALIBRATION_TEXT), num_samples=2,
                                   seq_len=64)
    # warm up what every run loads whatever the model's depth (datasets, the tokenizer, the modules a run imports,
    # the allocator's pools): a whole run of the same width with 2 blocks; then measure the deep one
    calibration_windows(cfg.dataset, resolve_tokenizer(cfg.tokenizer, sys.argv[1], None), 2, 64, 0)
    if sys.argv[4] == "stream":
        osp.compress_checkpoint(sys.argv[5], sys.argv[2] + "-warm-up", cfg)
    else:
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[5], quantization_config=cfg).save_pretrained(sys.argv[2] + "-w")
    cfg = osp.SparseScheduleConfig(sparsity=0.5, schedule="uniform", dataset=str(CALIBRATION_TEXT), num_samples=2,
                                   seq_len=64)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the current resident set
    base = peak()
    if sys.argv[4] == "stream":
        osp.compress_checkpoint(sys.argv[1], sys.argv[2], cfg)
    else:  # what the streaming path must not do: the whole model in memory
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg).save_pretrained(sys.argv[2])
    print("RESULT", json.dumps({"base": base, "peak": peak()}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak resident set from /proc/self/status")
def test_streaming_memory_stays_below_the_checkpoint_size(tmp_path, tokenizer):
    """A synthetic bf16 Llama of ~200 MB (40 blocks of hidden 512): after a warm-up run on 2 blocks of the same width
    (the constant cost of a run: imports, allocator pools), streaming it adds less than 3/4 of its size to the peak
    resident memory; the same measure of the in-memory path adds more than all of it, so the bound can fail."""
    from conftest import write_random_checkpoint

    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=40,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=512,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    src = tmp_path / "synthetic"
    size = write_random_checkpoint(src, config, max_shard_bytes=64 * 2**20)
    tokenizer.save_pretrained(src)
    config.num_hidden_layers = 2
    write_random_checkpoint(tmp_path / "warm-up", config, max_shard_bytes=64 * 2**20)
    tokenizer.save_pretrained(tmp_path / "warm-up")
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    growth = {}
    for mode in ("stream", "in-memory"):
        run = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / mode), str(TESTS), mode,
                              str(tmp_path / "warm-up")],
                             capture_output=True, text=True, timeout=900,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-4000:]
        got = json.loads(run.stdout.split("RESULT", 1)[1])
        growth[mode] = got["peak"] - got["base"]
    print({k: f"+{v / 2**20:.0f} MiB" for k, v in growth.items()}, f"checkpoint {size / 2**20:.0f} MiB")
    assert size > 190 * 2**20
    assert growth["stream"] < 0.75 * size, f"streaming: +{growth['stream'] / 2**20:.0f} MiB, checkpoint {size / 2**20:.0f}"
    assert growth["in-memory"] > size  # the measure sees a whole model
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "in-memory")
