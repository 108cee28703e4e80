"""Shared pieces of the benchmarks: the WikiText-2 protocol of shared/GPU.md and one compress+evaluate row."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIBRATION_FILE = SHARED / "wikitext2-valid.tokens"
EVAL_FILE = SHARED / "wikitext2-test.raw"
DATA = Path(__file__).parent / "data"
#: the benchmark texts, name -> file: WikiText-2 test (the calibration's domain) and held-out texts of other domains,
#: never used for calibration or to choose a default (sources and licences: ``benchmarks/data/README.md``):
#: Shakespeare's plays, a novel (Morris, 1890), a technical manual (US Army, 1911), Python source (CPython's stdlib)
EVAL_TEXTS = {
    "wikitext2": EVAL_FILE,
    "shakespeare": DATA / "shakespeare.txt",
    "novel": DATA / "morris_news_from_nowhere.txt",
    "manual": DATA / "infantry_drill_regulations.txt",
    "code": DATA / "python_stdlib.txt",
}


def wikitext_calibration_text(path: Path = CALIBRATION_FILE) -> list[str]:
    """wikitext2-valid.tokens with " @-@ ", " @,@ ", " @.@ " replaced by "-", ",", "." (one document)."""
    text = Path(path).read_text(encoding="utf-8")
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(a, b)
    return [text]


def load_eval_text(name: str, calibration: bool = False) -> Any:
    """What ``perplexity`` (or, with ``calibration``, a config's ``dataset``) takes for text ``name`` of
    :data:`EVAL_TEXTS`: WikiText-2's test file (its validation split, cleaned, for calibration), else the held-out
    file's text as one document."""
    if name == "wikitext2":
        return wikitext_calibration_text() if calibration else EVAL_FILE
    return [EVAL_TEXTS[name].read_text(encoding="utf-8")]


def write_result(out: str | Path, result: dict[str, Any]) -> None:
    """Record the exact command line in ``result`` and write it as JSON to ``out`` (folders created)."""
    result["command"] = " ".join(["python", "benchmarks/" + os.path.basename(sys.argv[0])] + sys.argv[1:])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def compress_and_evaluate(model_path: str, tokenizer: Any, config: Any, eval_file: Path = EVAL_FILE,
                          eval_seq_len: int = 2048, eval_windows: int | None = None) -> dict[str, Any]:
    """Load ``model_path`` in fp32 with ``quantization_config=config`` (compress on load), then measure perplexity.
    Returns the row: ppl, compression seconds, achieved weighted sparsity, per-module sparsities."""
    from transformers import AutoModelForCausalLM

    import optimum_sparsesched as osp
    from optimum_sparsesched.pipeline.plan import module_sizes
    from optimum_sparsesched.schedule.allocators import weighted_mean

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, quantization_config=config)
    seconds = time.perf_counter() - t0
    if torch.cuda.is_available():
        model.cuda()
    ppl = osp.perplexity(model, tokenizer, eval_file, eval_seq_len, eval_windows)
    q = model.config.quantization_config
    achieved = q.results.layer_sparsities
    return {"ppl": ppl, "compress_s": seconds, "achieved_sparsity": weighted_mean(achieved, module_sizes(model, achieved)),
            "layer_sparsities": achieved, "resolved_range": q.results.resolved_range,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
