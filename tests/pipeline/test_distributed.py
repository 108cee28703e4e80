"""torch.distributed: 2 gloo processes under torchrun give the single-process result (float tolerance)."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress

TESTS = Path(__file__).parents[1]  # the folder of conftest.py
OPTIONS = dict(sparsity=0.6, dataset=str(CALIBRATION_TEXT), num_samples=6, seq_len=64, probe_samples=2)

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from transformers import AutoTokenizer
    from optimum_sparsesched import SparseScheduleConfig, compress
    model = tiny_model({family!r}, num_hidden_layers=3)
    cfg = SparseScheduleConfig(schedule={schedule!r}, bits={bits!r}, preset={preset!r}, **{options!r}, **{extra!r})
    compress(model, cfg, tokenizer=AutoTokenizer.from_pretrained(sys.argv[1]))  # no distributed code here
    assert dist.is_initialized() and dist.get_world_size() == 2
    model.save_pretrained(sys.argv[2])  # rank 0 writes
    torch.save({{"state": model.state_dict(), "sparsities": cfg.results.layer_sparsities}}, sys.argv[3] + f".{{dist.get_rank()}}")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_processes(script, *args) -> None:
    """Run ``script ARGS...`` in 2 gloo processes (one thread each) under torch.distributed.run; must exit 0."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), str(script), *map(str, args)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.parametrize("family,schedule,bits,preset,extra", [
    ("llama", "hessian", None, "sparsegpt", {}), ("gpt2", "uniform", 4, "default", {}),
    ("llama", "uniform", None, "sparsegpt", {"reconstruct_epochs": 2, "reconstruct_lr": 1e-3})])
def test_two_gloo_processes_match_single_process(family, schedule, bits, preset, extra, tmp_path, tokenizer_dir,
                                                 tokenizer):
    """The same model on every rank, reloaded bit for bit; with the SparseGPT scan alone, the single-process result up
    to float summation order (the refit's conjugate gradients amplify those differences, the scan does not)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), family=family, schedule=schedule, bits=bits, preset=preset,
                                    options=OPTIONS, extra=extra))
    out = tmp_path / "saved"
    torchrun_two_processes(script, tokenizer_dir, out, tmp_path / "result")
    assert (out / "config.json").exists() and not list(tmp_path.glob(".saved.tmp-*"))

    ranks = [torch.load(tmp_path / f"result.{r}") for r in (0, 1)]
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])  # every rank holds the same model
    # the compact checkpoint holds every module's grid, also of the modules rank 1 solved
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in ranks[0]["state"].items())
    if bits is not None:
        return  # a quantization code flipped by summation order shifts a weight by a whole grid step

    reference = tiny_model(family, num_hidden_layers=3)
    cfg = SparseScheduleConfig(schedule=schedule, preset=preset, **OPTIONS, **extra)
    compress(reference, cfg, tokenizer=tokenizer)
    if extra:  # block reconstruction: each step sums the ranks' windows (a mini-batch of one window per rank), so
        # the trajectory is not the single process's; block 0's masks (from the same dense inputs) are the scan's
        for got in ranks:
            assert got["sparsities"] == pytest.approx(cfg.results.layer_sparsities, abs=2e-3)
            for key, ref in reference.state_dict().items():
                assert torch.isfinite(got["state"][key]).all()
                if key.startswith("model.layers.0.") and key.endswith("proj.weight"):
                    assert ((got["state"][key] == 0) == (ref == 0)).float().mean() > 0.995, key
        return
    for got in ranks:
        assert got["sparsities"].keys() == cfg.results.layer_sparsities.keys()
        for name, s in cfg.results.layer_sparsities.items():
            assert got["sparsities"][name] == pytest.approx(s, abs=2e-3), name
        for key, ref in reference.state_dict().items():
            same = torch.isclose(got["state"][key], ref, rtol=1e-3, atol=1e-4)
            assert same.float().mean() > 0.995, key  # summation order may flip a near-tie in the masks


STREAM_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from optimum_sparsesched import SparseScheduleConfig, compress_checkpoint
    cfg = SparseScheduleConfig(**{options!r})
    compress_checkpoint(sys.argv[1], sys.argv[2], cfg)  # every rank streams the blocks; rank 0 writes
    assert dist.is_initialized() and dist.get_world_size() == 2
    torch.save(cfg.results.layer_sparsities, sys.argv[3] + f".{{dist.get_rank()}}")
""")


def test_two_gloo_processes_stream_a_checkpoint(tmp_path, tokenizer):
    source = tmp_path / "source"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(source, max_shard_size="60KB")
    tokenizer.save_pretrained(source)
    script = tmp_path / "stream.py"
    options = {**OPTIONS, "preset": "sparsegpt"}  # the scan: the single-process result up to summation order
    script.write_text(STREAM_SCRIPT.format(options=options))
    out = tmp_path / "streamed"
    torchrun_two_processes(script, source, out, tmp_path / "sparsities")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    ranks = [torch.load(tmp_path / f"sparsities.{r}") for r in (0, 1)]
    assert ranks[0] == ranks[1]

    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=SparseScheduleConfig(**options))
    streamed = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key, ref in reference.state_dict().items():
        same = torch.isclose(streamed[key], ref, rtol=1e-3, atol=1e-4)
        assert same.float().mean() > 0.995, key  # summation order may flip a near-tie in the masks
