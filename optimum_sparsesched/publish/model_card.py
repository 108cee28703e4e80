"""Model cards of compressed checkpoints: ``README.md`` (and a plot of a non-uniform schedule), written by
``save_pretrained``.

The card is a huggingface_hub :class:`~huggingface_hub.ModelCard` built from the checkpoint's
``SparseScheduleConfig`` (``config.json`` → ``quantization_config``), short enough to read:

- metadata: ``base_model`` (the original hub id; a local path is left out), tags (``pruned``, ``sparse``,
  ``sparsegpt``, ``optimum-sparsesched``, ``int4``/``int8`` + ``gptq`` with ``bits``, the ``N:M`` pattern),
  ``library_name: transformers``, ``pipeline_tag: text-generation``, the calibration dataset when it is a hub
  dataset, and the evaluations recorded with :func:`record_eval_result` / :func:`record_zero_shot` as
  ``model-index`` entries;
- body: a title from the model (``SmolLM2-135M-Instruct, 70% sparse``), what was done, where the weights came from
  (``config.weights_source`` when the loader recorded it), the evaluation table with each figure's protocol, a
  compact view of the schedule (one sentence for a uniform one; runs of blocks and a plot,
  ``sparsity_schedule.png``, otherwise), how to load it; then, collapsed (``<details>``), the per-block and
  per-module table and the options of the run as JSON (the per-module results are in ``config.json``).

The card never shows a local path: paths among the options and the model's name are reduced to their last
component. A ``README.md`` that this package did not write (no ``optimum-sparsesched`` tag) is never replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub import ModelCard, ModelCardData

from ..config import SparseScheduleConfig, saved_config_dict
from ..formats.metadata import results_digest
from ..pipeline.plan import module_sizes
from ..schedule.allocators import weighted_mean
from ..version import __version__
from .eval_results import (HUB_DATASET_IDS, eval_protocol, hub_eval_result, quantization_config_of,
                           record_eval_result, record_zero_shot)
from .schedule_view import BlockRow, block_rows, is_uniform, module_table, plot_schedule, schedule_view

logger = logging.getLogger(__name__)

#: what the card is built from: the config itself, or its dict as config.json holds it
ConfigLike = SparseScheduleConfig | Mapping[str, Any]
CARD_FILE = "README.md"
PLOT_FILE = "sparsity_schedule.png"
#: how the card names each layer solver (``solver`` option)
SOLVER_NAMES = {"sparsegpt": "SparseGPT",
                "refit": "SparseGPT with the kept weights re-solved exactly (`solver=\"refit\"`)",
                "admm": "an ADMM support search seeded by SparseGPT (`solver=\"admm\"`)"}
CARD_TAG = "optimum-sparsesched"
#: card metadata: the results digest of the weights the card describes (:func:`.formats.metadata.results_digest`)
CARD_RESULTS_KEY = "optimum_sparsesched_results"
BASE_TAGS = ("pruned", "sparse", "sparsegpt", CARD_TAG)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

__all__ = ["record_eval_result", "record_zero_shot", "block_rows", "plot_schedule", "build_model_card",
           "card_for_model", "card_for_folder", "write_model_card", "BlockRow"]


# ---------------------------------------------------------------------------------------------- the card
def base_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The hub id a model came from: an ``owner/name`` that is not a local path; for a local folder that holds a
    card with a ``base_model`` (a reloaded compressed checkpoint), that base model; else None."""
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        card = Path(name) / CARD_FILE
        if card.is_file():
            try:
                base = ModelCard.load(card, ignore_metadata_errors=True).data.base_model
            except Exception:  # an unreadable card is no base model
                return None
            return base if isinstance(base, str) else None
        return None
    return name if _HUB_ID.fullmatch(name) and not os.path.exists(name) else None


def is_own_card(path: str | os.PathLike) -> bool:
    """True when ``path`` is a README this package wrote (its tags include ``optimum-sparsesched``)."""
    try:
        tags = ModelCard.load(Path(path), ignore_metadata_errors=True).data.tags or []
    except Exception:
        return False
    return CARD_TAG in tags


def _config_dicts(quantization_config: ConfigLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(as saved, flat)``: the config as ``config.json`` holds it, and one flat view of its options and results
    (checkpoints of 0.1.0 saved the results at the top level)."""
    saved = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config)
    return saved, {**saved, **(saved.get("results") or {})}


def _no_path(value: Any) -> Any:
    """A string that names a local file or folder -> its last component (recursively in lists and dicts)."""
    if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value) or os.sep in value
                                             and not _HUB_ID.fullmatch(value)):
        return Path(value).name
    if isinstance(value, list):
        return [_no_path(v) for v in value]
    if isinstance(value, dict):
        return {k: _no_path(v) for k, v in value.items()}
    return value


def card_options(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the run as the card shows them: without the per-module results (``config.json`` has them)
    and without local paths."""
    return {k: _no_path(v) for k, v in saved.items() if k != "results"}


def _tags(qc: Mapping[str, Any], extra: Iterable[str]) -> list[str]:
    tags = list(BASE_TAGS)
    if qc.get("bits"):
        tags += [f"int{qc['bits']}", "gptq"]
    if qc.get("pattern"):
        tags.append(str(qc["pattern"]))
    return list(dict.fromkeys([*tags, *extra]))


def model_label(name_or_path: str | os.PathLike | None, base_model: str | None = None) -> str | None:
    """A short name of the model for the title: the base model's repo name, else the last component of its
    name or path (never a whole local path)."""
    if base_model:
        return base_model.split("/")[-1]
    return Path(os.fspath(name_or_path)).name or None if name_or_path else None


def _title(label: str | None, qc: Mapping[str, Any], achieved: float) -> str:
    what = f"{achieved:.0%} sparse" + (f" ({qc['pattern']})" if qc.get("pattern") else "")
    if qc.get("bits"):
        what += f" + INT{qc['bits']}"
    return f"# {label or 'Model'}, {what}"


def _summary(qc: Mapping[str, Any], achieved: float, base_model: str | None, weights_source: str | None) -> str:
    pattern = f"the {qc['pattern']} pattern" if qc.get("pattern") else "unstructured"
    solver = SOLVER_NAMES.get(qc.get("solver") or "sparsegpt", str(qc.get("solver")))
    text = (f"Pruned with {solver} to **{achieved:.1%}** sparsity ({pattern}, target {qc.get('sparsity')}) with the "
            f"`{qc.get('schedule')}` layer-wise sparsity schedule")
    if qc.get("search_steps"):
        text += f", refined by {qc['search_steps']} steps of allocation search"
    if qc.get("reconstruct_epochs"):
        text += (f", each block's kept weights then fitted to the dense block's outputs ({qc['reconstruct_epochs']} "
                 "epochs of block reconstruction)")
    if qc.get("bits"):
        grid = "per output channel" if qc.get("group_size") == -1 else f"group size {qc.get('group_size')}"
        text += (f", its kept weights GPTQ-quantized to INT{qc['bits']} ({grid}, "
                 f"{'symmetric' if qc.get('sym') else 'asymmetric'} grid) in the same pass")
    dataset = qc.get("dataset")
    text += (f". Calibration: {qc.get('num_samples')} windows of {qc.get('seq_len')} tokens from "
             f"`{_no_path(str(dataset)) if dataset not in HUB_DATASET_IDS else dataset}`. "
             f"Made with optimum-sparsesched {__version__}.")
    if weights_source:
        source = f"**Weights:** {weights_source}."
    elif base_model:
        source = f"**Weights:** [{base_model}](https://huggingface.co/{base_model}) from the Hugging Face Hub."
    else:
        source = "**Weights:** a local checkpoint."
    return text + "\n\n" + source


def _evaluation(entries: list[Mapping[str, Any]]) -> str:
    table = ["| metric | value | dataset | split | protocol |", "|---|---|---|---|---|"]
    for r in entries:
        value = f"{r['value']:.4f}" if r["metric"].startswith("acc") else f"{r['value']:.2f}"
        table.append(f"| {r['metric']} | {value} | `{r['dataset']}` | {r.get('split') or '–'} | {eval_protocol(r)} |")
    return "\n".join(table)


def build_model_card(quantization_config: ConfigLike, *, sizes: Mapping[str, int] | None = None,
                     base_model: str | None = None, model_name: str | None = None, repo_id: str | None = None,
                     plot_file: str | None = PLOT_FILE, extra_tags: Iterable[str] = (),
                     name_or_path: str | None = None, weights_source: str | None = None) -> ModelCard:
    """The card of a compressed checkpoint from its ``SparseScheduleConfig`` (or its ``to_dict()``).

    ``sizes``: parameters per compressed module (weighted block sparsities and the parameter column);
    ``base_model``: hub id of the original model; ``model_name``: name in ``model-index`` (default: the repo
    name); ``repo_id``: used in the loading snippet; ``plot_file``: the schedule plot next to the README (None: no
    plot); ``name_or_path``: the model's name or path (the title uses its last component when there is no base
    model); ``weights_source``: where the weights came from, in words (``model.config.weights_source``).
    """
    saved, qc = _config_dicts(quantization_config)
    sparsities = qc.get("layer_sparsities") or {}
    if not sparsities:
        raise ValueError("quantization_config: no layer_sparsities; the model has not been compressed")
    if isinstance(qc.get("measured"), dict):  # what the save measured on the weights, over what the run was asked
        qc["pattern"] = qc["measured"].get("pattern")
    rows = block_rows(sparsities, sizes)
    known = sizes is not None and all(n in sizes for n in sparsities)
    achieved = weighted_mean(sparsities, sizes) if known else sum(sparsities.values()) / len(sparsities)
    label = model_label(name_or_path, base_model)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None) or (
        f"{label}-sparse" if label else "sparse-schedule-model")
    dataset = qc.get("dataset")
    entries = list(qc.get("eval_results") or [])
    evals = [hub_eval_result(r) for r in entries]
    data = ModelCardData(base_model=base_model, tags=_tags(qc, extra_tags), library_name="transformers",
                         pipeline_tag="text-generation",
                         datasets=[HUB_DATASET_IDS[dataset][0]] if dataset in HUB_DATASET_IDS else None,
                         model_name=model_name, eval_results=evals or None,
                         **{CARD_RESULTS_KEY: results_digest(sparsities)})
    parts = [_title(label, qc, achieved), _summary(qc, achieved, base_model, weights_source)]
    if entries:
        parts += ["## Evaluation", _evaluation(entries)]
    parts += ["## Schedule", schedule_view(rows, qc.get("resolved_range"))]
    if plot_file:
        parts.append(f"![Achieved sparsity per decoder block against the target]({plot_file})")
    where = repo_id or "path/to/this/checkpoint"
    parts += ["## How to use", "The weights load with plain transformers once the quantization method is registered "
              "(no calibration runs on load):",
              "```python\nimport optimum_sparsesched  # registers the `sparse_schedule` quantization method\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```',
              "## Details",
              f"<details>\n<summary>Sparsity per decoder block and module ({len(sparsities)} modules"
              + (f", {sum(sizes[n] for n in sparsities):,} parameters" if known else "")
              + f"; {achieved:.4f} over all)</summary>\n\n{module_table(rows)}\n\n</details>",
              "<details>\n<summary>Options of the run (the per-module results are in <code>config.json</code> under "
              "<code>quantization_config.results</code>)</summary>\n\n```json\n"
              + json.dumps(card_options(saved), indent=2, sort_keys=True, default=str) + "\n```\n\n</details>"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


def write_model_card(folder: str | os.PathLike, quantization_config: ConfigLike, *,
                     sizes: Mapping[str, int] | None = None,
                     base_model: str | None = None, model_name: str | None = None, repo_id: str | None = None,
                     extra_tags: Iterable[str] = (), name_or_path: str | None = None,
                     weights_source: str | None = None) -> ModelCard:
    """Write ``README.md`` (and ``sparsity_schedule.png`` for a non-uniform schedule) into ``folder``; returns the
    card."""
    folder = Path(folder)
    saved, qc = _config_dicts(quantization_config)
    rows = block_rows(qc.get("layer_sparsities") or {}, sizes)
    title = f"{qc.get('schedule')} schedule, target {qc.get('sparsity')}"
    plotted = bool(rows) and not is_uniform(rows) and plot_schedule(
        rows, float(qc.get("sparsity", 0.0)), folder / PLOT_FILE, sparsity_range=qc.get("resolved_range"), title=title)
    card = build_model_card(saved, sizes=sizes, base_model=base_model, model_name=model_name, repo_id=repo_id,
                            plot_file=PLOT_FILE if plotted else None, extra_tags=extra_tags,
                            name_or_path=name_or_path, weights_source=weights_source)
    card.save(folder / CARD_FILE)
    return card


def card_for_model(model: Any, folder: str | os.PathLike, *, model_name: str | None = None,
                   repo_id: str | None = None, extra_tags: Iterable[str] = ()) -> ModelCard | None:
    """Write the card of a compressed model (in memory) into ``folder``; None (no card) when nothing was
    compressed."""
    config = quantization_config_of(model)
    if not config.results.compressed:
        return None
    model_config = getattr(model, "config", None)
    name_or_path = getattr(model_config, "name_or_path", None) or getattr(model, "name_or_path", None)
    return write_model_card(folder, config, sizes=module_sizes(model, config.results.layer_sparsities),
                            base_model=base_model_id(name_or_path), model_name=model_name, repo_id=repo_id,
                            extra_tags=list(getattr(model, "model_tags", None) or []) + list(extra_tags),
                            name_or_path=name_or_path, weights_source=getattr(model_config, "weights_source", None))


def card_for_folder(folder: str | os.PathLike, *, repo_id: str | None = None) -> ModelCard:
    """Write the card of a saved compressed checkpoint from its ``config.json``; module sizes come from the
    architecture built on the meta device (no weights are read)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    saved = saved_config_dict(config)
    _, qc = _config_dicts(saved)
    sizes = None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        arch = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            sizes = module_sizes(AutoModelForCausalLM.from_config(arch), qc.get("layer_sparsities") or {})
    except Exception as exc:  # an architecture transformers cannot build: the card goes without sizes
        logger.warning("model card without parameter counts: %s", exc)
    name_or_path = config.get("_name_or_path") or config.get("model_type")
    return write_model_card(folder, saved, sizes=sizes, base_model=base_model_id(config.get("_name_or_path")),
                            model_name=repo_id.split("/")[-1] if repo_id else folder.name, repo_id=repo_id,
                            name_or_path=name_or_path, weights_source=config.get("weights_source"))
