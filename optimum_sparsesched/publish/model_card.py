"""Model cards of compressed checkpoints: ``README.md`` and a plot of the schedule, written by ``save_pretrained``.

The card is a huggingface_hub :class:`~huggingface_hub.ModelCard` built from the checkpoint's
``SparseScheduleConfig`` (``config.json`` → ``quantization_config``):

- metadata: ``base_model`` (the original hub id; a local path is left out), tags (``pruned``, ``sparse``,
  ``sparsegpt``, ``optimum-sparsesched``, ``int4``/``int8`` + ``gptq`` with ``bits``, the ``N:M`` pattern),
  ``library_name: transformers``, ``pipeline_tag: text-generation``, the calibration dataset when it is a hub
  dataset, and the evaluations recorded with :func:`record_eval_result` as ``model-index`` entries;
- body: a summary, the evaluation table, a plot of the per-block sparsity against the target
  (``sparsity_schedule.png``, next to the README), one table row per decoder block (parameters, achieved sparsity,
  the value of every module), how to load the checkpoint, and the exact config as JSON.

A ``README.md`` that this package did not write (no ``optimum-sparsesched`` tag) is never replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..config import saved_config_dict
from ..pipeline.plan import module_sizes
from ..schedule.allocators import weighted_mean
from ..version import __version__

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
PLOT_FILE = "sparsity_schedule.png"
CARD_TAG = "optimum-sparsesched"
BASE_TAGS = ("pruned", "sparse", "sparsegpt", CARD_TAG)
#: calibration names of :mod:`.calibration` -> (hub dataset id, config)
HUB_DATASET_IDS = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"), "c4": ("allenai/c4", "en")}
MAX_MODULE_COLUMNS = 12
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------- eval results
def _quantization_config(model_or_config: Any) -> Any:
    config = getattr(getattr(model_or_config, "config", None), "quantization_config", model_or_config)
    if getattr(config, "quant_method", None) != "sparse_schedule" or not hasattr(config, "results"):
        raise ValueError("model: not compressed by optimum-sparsesched (its config has no sparse_schedule "
                         "quantization_config); compress it first")
    return config


def record_eval_result(model: Any, value: float, *, dataset: str | os.PathLike, split: str | None = None,
                       metric: str = "perplexity", seq_len: int | None = None,
                       windows: int | None = None) -> dict[str, Any]:
    """Record an evaluation of a compressed ``model`` (or its ``SparseScheduleConfig``) in
    ``quantization_config.results.eval_results``; it is saved in ``config.json`` and shown in the model card (``model-index``).

    ``dataset`` is a hub dataset name or a file; a path is recorded by its file name only (a card never shows
    local paths). A result with the same metric, dataset, split, ``seq_len`` and ``windows`` replaces the earlier one.
    Returns the recorded entry ``{"metric", "value", "dataset", "split", "seq_len"[, "windows"]}``.
    """
    config = _quantization_config(model)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value: {value!r} is not valid; allowed: a finite number")
    if not isinstance(dataset, (str, os.PathLike)) or not str(dataset).strip():
        raise ValueError(f"dataset: {dataset!r} is not valid; allowed: a hub dataset name or a file path")
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"metric: {metric!r} is not valid; allowed: a non-empty name such as 'perplexity'")
    for name, v in (("seq_len", seq_len), ("windows", windows)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}: {v!r} is not valid; allowed: None or a positive integer")
    name = str(dataset)
    if isinstance(dataset, os.PathLike) or os.path.exists(name):
        name = Path(name).name
    entry: dict[str, Any] = {"metric": metric, "value": float(value), "dataset": name, "split": split,
                             "seq_len": seq_len}
    if windows is not None:
        entry["windows"] = windows
    key = {k: v for k, v in entry.items() if k != "value"}
    results = config.results
    results.eval_results = [r for r in results.eval_results
                            if {k: r.get(k) for k in key} != {k: v for k, v in key.items()}] + [entry]
    return entry


def _eval_result(entry: Mapping[str, Any]) -> EvalResult:
    hub = HUB_DATASET_IDS.get(entry["dataset"])
    args = {k: entry[k] for k in ("seq_len", "windows") if entry.get(k) is not None}
    return EvalResult(task_type="text-generation", dataset_type=hub[0] if hub else entry["dataset"],
                      dataset_name=entry["dataset"], dataset_config=hub[1] if hub else None,
                      dataset_split=entry.get("split"), metric_type=entry["metric"], metric_value=entry["value"],
                      metric_args=args or None)


# ---------------------------------------------------------------------------------------------- per-block table
@dataclass
class BlockRow:
    """The compressed modules of one decoder block (``index`` None: modules outside the numbered blocks)."""

    index: int | None
    params: int | None
    sparsity: float
    modules: dict[str, float] = field(default_factory=dict)


def block_rows(layer_sparsities: Mapping[str, float], sizes: Mapping[str, int] | None = None) -> list[BlockRow]:
    """Group ``{module name: sparsity}`` by decoder block (the first numeric component of the name:
    ``model.layers.3.mlp.up_proj`` -> block 3, module ``mlp.up_proj``), modules in the order of ``sizes`` (the
    model's order; config.json sorts its keys). A block's sparsity is parameter-weighted when every size is known,
    else the plain mean."""
    groups: dict[int | None, dict[str, str]] = {}
    order = {n: k for k, n in enumerate(sizes or ())}
    for name in sorted(layer_sparsities, key=lambda n: order.get(n, len(order))):
        match = _BLOCK.match(name)
        index, short = (int(match.group(2)), match.group(3)) if match else (None, name)
        groups.setdefault(index, {})[short] = name
    rows = []
    for index in sorted(groups, key=lambda i: (i is None, i or 0)):
        names = groups[index]
        values = {short: float(layer_sparsities[n]) for short, n in names.items()}
        known = sizes is not None and all(n in sizes for n in names.values())
        params = sum(sizes[n] for n in names.values()) if known else None
        mean = (sum(sizes[n] * layer_sparsities[n] for n in names.values()) / params if known and params
                else sum(values.values()) / len(values))
        rows.append(BlockRow(index, params, float(mean), values))
    return rows


def _table(rows: list[BlockRow]) -> str:
    columns = list(dict.fromkeys(short for row in rows if row.index is not None for short in row.modules))
    per_module = 0 < len(columns) <= MAX_MODULE_COLUMNS
    head = ["block", "parameters", "sparsity"] + ([f"`{c}`" for c in columns] if per_module else ["modules"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ["other" if row.index is None else str(row.index),
                 f"{row.params:,}" if row.params is not None else "–", f"{row.sparsity:.3f}"]
        if per_module and row.index is not None:
            cells += [f"{row.modules[c]:.3f}" if c in row.modules else "–" for c in columns]
        else:
            text = ", ".join(f"`{k}` {v:.3f}" for k, v in row.modules.items())
            cells += [text] + ["" for _ in columns[1:]] if per_module else [text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_schedule(rows: list[BlockRow], target: float, path: str | os.PathLike, *,
                  sparsity_range: Iterable[float] | None = None, title: str = "") -> bool:
    """Bar chart of the achieved sparsity per block with the target as a dashed line (and the schedule's range as
    dotted lines), saved as PNG with matplotlib's Agg canvas (no global pyplot state). False when matplotlib is
    not installed (the card then has no plot)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("matplotlib is not installed: the model card has no schedule plot "
                       "(pip install 'optimum-sparsesched[hub]')")
        return False
    blocks = [r for r in rows if r.index is not None]
    fig = Figure(figsize=(7, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([r.index for r in blocks], [r.sparsity for r in blocks], color="#4c72b0", label="achieved")
    ax.axhline(target, color="#c44e52", linestyle="--", linewidth=1.5, label=f"target {target:g}")
    if sparsity_range is not None:
        for k, bound in enumerate(sparsity_range):
            ax.axhline(bound, color="grey", linestyle=":", linewidth=1, label="range" if k == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1.1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", metadata={"Software": None})
    return True


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


def _config_dicts(quantization_config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(as saved, flat)``: the config as ``config.json`` holds it, and one flat view of its options and results
    (checkpoints of 0.1.0 saved the results at the top level)."""
    saved = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config)
    return saved, {**saved, **(saved.get("results") or {})}


def _tags(qc: Mapping[str, Any], extra: Iterable[str]) -> list[str]:
    tags = list(BASE_TAGS)
    if qc.get("bits"):
        tags += [f"int{qc['bits']}", "gptq"]
    if qc.get("pattern"):
        tags.append(str(qc["pattern"]))
    return list(dict.fromkeys([*tags, *extra]))


def _summary(qc: Mapping[str, Any], achieved: float, base_model: str | None) -> str:
    what = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A model"
    pattern = f"the {qc['pattern']} pattern" if qc.get("pattern") else "unstructured"
    text = (f"{what} pruned with SparseGPT to **{achieved:.1%}** sparsity ({pattern}, target "
            f"{qc.get('sparsity')}) with the `{qc.get('schedule')}` layer-wise sparsity schedule")
    if qc.get("bits"):
        grid = "per output channel" if qc.get("group_size") == -1 else f"group size {qc.get('group_size')}"
        text += (f", its kept weights GPTQ-quantized to INT{qc['bits']} ({grid}, "
                 f"{'symmetric' if qc.get('sym') else 'asymmetric'} grid) in the same pass")
    dataset = qc.get("dataset")
    text += (f". Calibration: {qc.get('num_samples')} windows of {qc.get('seq_len')} tokens from "
             f"`{Path(str(dataset)).name if dataset not in HUB_DATASET_IDS else dataset}`")
    if qc.get("resolved_range"):
        lo, hi = qc["resolved_range"]
        text += f"; per-layer sparsities in [{lo:.3f}, {hi:.3f}]"
    return text + "."


def build_model_card(quantization_config: Any, *, sizes: Mapping[str, int] | None = None,
                     base_model: str | None = None, model_name: str | None = None, repo_id: str | None = None,
                     plot_file: str | None = PLOT_FILE, extra_tags: Iterable[str] = ()) -> ModelCard:
    """The card of a compressed checkpoint from its ``SparseScheduleConfig`` (or its ``to_dict()``).

    ``sizes``: parameters per compressed module (weighted block sparsities and the parameter column);
    ``base_model``: hub id of the original model; ``model_name``: name in ``model-index`` and the title (default:
    the repo name); ``repo_id``: used in the loading snippet; ``plot_file``: the schedule plot next to the README
    (None: no plot).
    """
    saved, qc = _config_dicts(quantization_config)
    sparsities = qc.get("layer_sparsities") or {}
    if not sparsities:
        raise ValueError("quantization_config: no layer_sparsities; the model has not been compressed")
    rows = block_rows(sparsities, sizes)
    known = sizes is not None and all(n in sizes for n in sparsities)
    achieved = weighted_mean(sparsities, sizes) if known else sum(sparsities.values()) / len(sparsities)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None) or (
        f"{base_model.split('/')[-1]}-sparse" if base_model else "sparse-schedule-model")
    dataset = qc.get("dataset")
    evals = [_eval_result(r) for r in qc.get("eval_results") or []]
    data = ModelCardData(base_model=base_model, tags=_tags(qc, extra_tags), library_name="transformers",
                         pipeline_tag="text-generation",
                         datasets=[HUB_DATASET_IDS[dataset][0]] if dataset in HUB_DATASET_IDS else None,
                         model_name=model_name, eval_results=evals or None)
    parts = [f"# {model_name}", _summary(qc, achieved, base_model),
             f"Made with optimum-sparsesched {__version__} (SparseGPT with layer-wise sparsity schedules)."]
    if evals:
        table = ["| metric | value | dataset | split | sequence length | windows |", "|---|---|---|---|---|---|"]
        for r in qc["eval_results"]:
            table.append(f"| {r['metric']} | {r['value']:.3f} | `{r['dataset']}` | {r.get('split') or '–'} | "
                         f"{r.get('seq_len') or '–'} | {r.get('windows') or 'all'} |")
        parts += ["## Evaluation", "\n".join(table)]
    parts.append("## Sparsity per layer")
    if plot_file:
        parts.append(f"![Achieved sparsity per decoder block against the target]({plot_file})")
    parts += [f"Achieved over all compressed weights: **{achieved:.4f}** ({len(sparsities)} modules"
              + (f", {sum(sizes[n] for n in sparsities):,} parameters" if known else "") + ").", _table(rows)]
    where = repo_id or "path/to/this/checkpoint"
    parts += ["## How to use", "The weights load with plain transformers once the quantization method is registered "
              "(no calibration runs on load):",
              "```python\nimport optimum_sparsesched  # registers the `sparse_schedule` quantization method\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```',
              "## Compression config", "The `quantization_config` of `config.json`, exactly:",
              "```json\n" + json.dumps(saved, indent=2, sort_keys=True, default=str) + "\n```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


def write_model_card(folder: str | os.PathLike, quantization_config: Any, *, sizes: Mapping[str, int] | None = None,
                     base_model: str | None = None, model_name: str | None = None, repo_id: str | None = None,
                     extra_tags: Iterable[str] = ()) -> ModelCard:
    """Write ``README.md`` and ``sparsity_schedule.png`` into ``folder``; returns the card."""
    folder = Path(folder)
    saved, qc = _config_dicts(quantization_config)
    rows = block_rows(qc.get("layer_sparsities") or {}, sizes)
    title = f"{qc.get('schedule')} schedule, target {qc.get('sparsity')}"
    plotted = bool(rows) and plot_schedule(rows, float(qc.get("sparsity", 0.0)), folder / PLOT_FILE,
                                           sparsity_range=qc.get("resolved_range"), title=title)
    card = build_model_card(saved, sizes=sizes, base_model=base_model, model_name=model_name, repo_id=repo_id,
                            plot_file=PLOT_FILE if plotted else None, extra_tags=extra_tags)
    card.save(folder / CARD_FILE)
    return card


def card_for_model(model: Any, folder: str | os.PathLike, *, model_name: str | None = None,
                   repo_id: str | None = None, extra_tags: Iterable[str] = ()) -> ModelCard | None:
    """Write the card of a compressed model (in memory) into ``folder``; None (no card) when nothing was
    compressed."""
    config = _quantization_config(model)
    if not config.results.compressed:
        return None
    return write_model_card(folder, config, sizes=module_sizes(model, config.results.layer_sparsities),
                            base_model=base_model_id(getattr(getattr(model, "config", None), "name_or_path", None)
                                                     or getattr(model, "name_or_path", None)), model_name=model_name,
                            repo_id=repo_id, extra_tags=list(getattr(model, "model_tags", None) or []) + list(extra_tags))


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
    return write_model_card(folder, saved, sizes=sizes, base_model=base_model_id(config.get("_name_or_path")),
                            model_name=repo_id.split("/")[-1] if repo_id else folder.name, repo_id=repo_id)
