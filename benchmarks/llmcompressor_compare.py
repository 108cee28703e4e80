#!/usr/bin/env python3
"""``preset="sparsegpt"`` (uniform) against llm-compressor's ``SparseGPTModifier`` on identical calibration windows:
CPU seconds of the compression alone, and perplexity of both results in one evaluation.

llm-compressor lives in its own virtual environment (its transformers pin differs from ours); create it once with

    python3 -m venv /work/venvs/llmcompressor
    /work/venvs/llmcompressor/bin/pip install torch==2.13.0          # the CPU build: no CUDA torch pulled in
    /work/venvs/llmcompressor/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

Then, from this project's environment:

    OMP_NUM_THREADS=2 python benchmarks/llmcompressor_compare.py MODEL_DIR [--pattern 2:4 | --sparsity 0.5]
        [--llmcompressor-python /work/venvs/llmcompressor/bin/python] [--out benchmarks/results/llmcompressor/X.json]

The driver draws the calibration windows of the reduced-512 protocol (16 random windows of 512 tokens of
wikitext2-valid, seed 0: what ``SparseScheduleConfig(num_samples=16, seq_len=512)`` draws) and writes them to a
file. Two worker processes, one at a time, each load the model in float32 (not timed) and time only the
compression (``resource.getrusage``: user+sys of every thread of the process, and wall):

- ``llmcompressor``: ``oneshot(model, dataset=<those windows as input_ids>, recipe=SparseGPTModifier(sparsity,
  mask_structure, targets=Linear, ignore=lm_head), pipeline="sequential", shuffle_calibration_samples=False)``;
- ``ours``: ``optimum_sparsesched.compress(model, SparseScheduleConfig(preset="sparsegpt", schedule="uniform",
  ...))``, after checking that the windows it draws are the file's.

Each worker saves its compressed weights; the driver evaluates both with the same code (perplexity on the first 16
windows of 512 tokens of WikiText-2 test and of benchmarks/data/shakespeare.txt) and checks sparsity and pattern.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_FILE, wikitext_calibration_text, write_result  # noqa: E402

SHAKESPEARE = Path(__file__).parent / "data" / "shakespeare.txt"
LLMC_PYTHON = "/work/venvs/llmcompressor/bin/python"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> dict:
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return {"compress_cpu_s": cpu_seconds() - c0, "compress_wall_s": time.perf_counter() - t0}


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
             if k.startswith("model.layers.")}
    save_file(state, str(path))


def worker_llmcompressor(model_dir: str, windows_file: str, out: Path, sparsity: float, pattern: str | None) -> dict:
    """In llm-compressor's environment: its SparseGPTModifier on the given windows."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor

    windows = torch.load(windows_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=pattern or "0:0", block_size=128,
                               dampening_frac=0.01, targets=["Linear"], ignore=["re:.*lm_head"])
    row = timed(lambda: oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
                                num_calibration_samples=len(windows), max_seq_length=windows.shape[1],
                                shuffle_calibration_samples=False, pipeline="sequential"))
    save_weights(model, out)
    return dict(row, version=llmcompressor.__version__)


def worker_ours(model_dir: str, windows_file: str, out: Path, sparsity: float, pattern: str | None) -> dict:
    """In this project's environment: preset="sparsegpt", schedule="uniform", on the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp
    from optimum_sparsesched.pipeline.calibration import calibration_windows

    windows = torch.load(windows_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = wikitext_calibration_text()
    drawn = calibration_windows(calibration, tokenizer, len(windows), windows.shape[1], 0)
    if not torch.equal(drawn, windows):
        raise SystemExit("ours: the configuration would draw other calibration windows than the file's")
    config = osp.SparseScheduleConfig(sparsity=sparsity, pattern=pattern, preset="sparsegpt", schedule="uniform",
                                      dataset=calibration, num_samples=len(windows), seq_len=windows.shape[1],
                                      seed=0, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    row = timed(lambda: osp.compress(model, config, tokenizer))
    save_weights(model, out)
    return dict(row, version=osp.__version__, package=osp.__file__)


def evaluate(model_dir: str, weights: Path, nm: tuple[int, int] | None) -> dict:
    """Perplexity (reduced-512) of the model with ``weights``, its decoder sparsity and N:M check."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = load_file(str(weights))
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    linears = {k: v for k, v in state.items() if k.endswith("proj.weight")}
    zeros = sum(int((v == 0).sum()) for v in linears.values()) / sum(v.numel() for v in linears.values())
    pattern_ok = None
    if nm is not None:
        pattern_ok = all(bool(((v == 0).view(v.shape[0], -1, nm[1]).sum(-1) >= nm[0]).all()) for v in linears.values())
    texts = {"wikitext2": EVAL_FILE, "shakespeare": [SHAKESPEARE.read_text(encoding="utf-8")]}
    with torch.no_grad():
        ppl = {k: osp.perplexity(model, tokenizer, t, 512, 16) for k, t in texts.items()}
    return {"ppl": ppl, "decoder_linear_zeros": zeros, "nm_pattern_holds": pattern_ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M (then sparsity = N/M)")
    ap.add_argument("--llmcompressor-python", default=LLMC_PYTHON)
    ap.add_argument("--sides", nargs="+", default=["llmcompressor", "ours"], choices=["llmcompressor", "ours"])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=["llmcompressor", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--windows", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    nm = tuple(int(x) for x in args.pattern.split(":")) if args.pattern else None
    sparsity = nm[0] / nm[1] if nm else args.sparsity
    torch.set_grad_enabled(False)

    if args.worker:  # one side, in its own process; prints its row as the last line
        work = worker_llmcompressor if args.worker == "llmcompressor" else worker_ours
        row = work(args.model, args.windows, Path(args.weights), sparsity, args.pattern)
        print(json.dumps(row), flush=True)
        return

    from transformers import AutoTokenizer

    from optimum_sparsesched.pipeline.calibration import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(wikitext_calibration_text(), tokenizer, args.num_samples, args.seq_len, 0)
    result = {"sparsity": sparsity, "pattern": args.pattern, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "windows": list(windows.shape)}
    with tempfile.TemporaryDirectory() as tmp:
        windows_file = Path(tmp) / "windows.pt"
        torch.save(windows, windows_file)
        for side in args.sides:
            python = args.llmcompressor_python if side == "llmcompressor" else sys.executable
            weights = Path(tmp) / f"{side}.safetensors"
            cmd = [python, __file__, args.model, "--worker", side, "--windows", str(windows_file),
                   "--weights", str(weights), "--sparsity", str(sparsity)] + (["--pattern", args.pattern]
                                                                            if args.pattern else [])
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            if side == "llmcompressor":
                env.pop("PYTHONPATH", None)  # nothing of this project in llm-compressor's process
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if run.returncode != 0:
                raise SystemExit(f"{side} worker failed:\n{run.stderr[-4000:]}")
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row.update(evaluate(args.model, weights, nm))
            result[side] = row
            print(side, json.dumps(row), flush=True)
    if {"llmcompressor", "ours"} <= result.keys():
        a, b = result["ours"], result["llmcompressor"]
        result["cpu_ratio_ours_over_llmcompressor"] = a["compress_cpu_s"] / b["compress_cpu_s"]
        result["ppl_ratio_ours_over_llmcompressor"] = {k: a["ppl"][k] / b["ppl"][k] for k in a["ppl"]}
        print("CPU time ours / llm-compressor: %.3f; perplexity ratios %s" % (
            result["cpu_ratio_ours_over_llmcompressor"], result["ppl_ratio_ours_over_llmcompressor"]))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
