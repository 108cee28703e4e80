"""Evaluations recorded on a compressed model: ``quantization_config.results.eval_results``, saved in
``config.json`` and shown in the model card (its table and the ``model-index`` metadata).

Each entry: ``{"metric", "value", "dataset", "split", "seq_len"[, "windows"][, "num_fewshot"][, "samples"]}`` —
perplexity with its window protocol, or an lm-eval accuracy with its few-shot count and number of documents.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult

from ..config import SparseScheduleConfig

#: calibration names of :mod:`.calibration` -> (hub dataset id, config)
HUB_DATASET_IDS = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"), "c4": ("allenai/c4", "en")}
#: entries of an evaluation result other than its value (the key that a newer result replaces)
EVAL_ARGS = ("seq_len", "windows", "num_fewshot", "samples")


def quantization_config_of(model_or_config: Any) -> SparseScheduleConfig:
    """The ``SparseScheduleConfig`` of a compressed model (or the config itself); ``ValueError`` otherwise."""
    config = getattr(getattr(model_or_config, "config", None), "quantization_config", model_or_config)
    if getattr(config, "quant_method", None) != "sparse_schedule" or not hasattr(config, "results"):
        raise ValueError("model: not compressed by optimum-sparsesched (its config has no sparse_schedule "
                         "quantization_config); compress it first")
    return config


def record_eval_result(model: Any, value: float, *, dataset: str | os.PathLike, split: str | None = None,
                       metric: str = "perplexity", seq_len: int | None = None, windows: int | None = None,
                       num_fewshot: int | None = None, samples: int | None = None) -> dict[str, Any]:
    """Record an evaluation of a compressed ``model`` (or its ``SparseScheduleConfig``) in
    ``quantization_config.results.eval_results``; it is saved in ``config.json`` and shown in the model card
    (``model-index``).

    ``dataset`` is a hub dataset name, an lm-eval task name or a file; a path is recorded by its file name only (a
    card never shows local paths). The protocol: ``seq_len`` and ``windows`` for perplexity, ``num_fewshot`` and
    ``samples`` (documents evaluated) for accuracies. A result with the same metric, dataset, split and protocol
    replaces the earlier one. Returns the recorded entry.
    """
    config = quantization_config_of(model)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value: {value!r} is not valid; allowed: a finite number")
    if not isinstance(dataset, (str, os.PathLike)) or not str(dataset).strip():
        raise ValueError(f"dataset: {dataset!r} is not valid; allowed: a hub dataset name or a file path")
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"metric: {metric!r} is not valid; allowed: a non-empty name such as 'perplexity'")
    for name, v in (("seq_len", seq_len), ("windows", windows), ("samples", samples)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}: {v!r} is not valid; allowed: None or a positive integer")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise ValueError(f"num_fewshot: {num_fewshot!r} is not valid; allowed: None or an integer >= 0")
    name = str(dataset)
    if isinstance(dataset, os.PathLike) or os.path.exists(name) or os.path.isabs(name):
        name = Path(name).name
    entry: dict[str, Any] = {"metric": metric, "value": float(value), "dataset": name, "split": split,
                             "seq_len": seq_len}
    entry.update({k: v for k, v in (("windows", windows), ("num_fewshot", num_fewshot), ("samples", samples))
                  if v is not None})
    key = {k: v for k, v in entry.items() if k != "value"}
    results = config.results
    results.eval_results = [r for r in results.eval_results
                            if {k: r.get(k) for k in key} != {k: v for k, v in key.items()}] + [entry]
    return entry


def record_zero_shot(model: Any, results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Record every accuracy of :func:`optimum_sparsesched.zero_shot`'s ``{task: TaskResult}`` with
    :func:`record_eval_result` (metric ``acc``/``acc_norm``, dataset = the task). Returns the entries."""
    return [record_eval_result(model, value, dataset=r.task, split=r.split, metric=metric,
                               num_fewshot=r.num_fewshot, samples=r.samples or None)
            for r in results.values() for metric, value in r.metrics.items()]


def hub_eval_result(entry: Mapping[str, Any]) -> EvalResult:
    hub = HUB_DATASET_IDS.get(entry["dataset"])
    args = {k: entry[k] for k in EVAL_ARGS if entry.get(k) is not None}
    return EvalResult(task_type="text-generation", dataset_type=hub[0] if hub else entry["dataset"],
                      dataset_name=entry["dataset"], dataset_config=hub[1] if hub else None,
                      dataset_split=entry.get("split"), metric_type=entry["metric"], metric_value=entry["value"],
                      metric_args=args or None)


def eval_protocol(entry: Mapping[str, Any]) -> str:
    """How a recorded result was measured, in words: ``"8 windows × 512 tokens"``, ``"0-shot, 500 documents"``."""
    parts = []
    if entry.get("seq_len"):
        windows = entry.get("windows")
        parts.append(f"{windows if windows else 'all'} window{'s' * (windows != 1)} × {entry['seq_len']} tokens")
    if entry.get("num_fewshot") is not None:
        parts.append(f"{entry['num_fewshot']}-shot")
    if entry.get("samples"):
        parts.append(f"{entry['samples']} documents")
    return ", ".join(parts) or "–"


