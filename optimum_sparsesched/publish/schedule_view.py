"""The schedule of a compressed model as the card shows it: per-block rows (parameter-weighted sparsity and every
module), a compact view (one sentence for a uniform schedule, a few rows otherwise) and a bar plot."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

MAX_MODULE_COLUMNS = 12
#: blocks whose sparsities differ by less than this are shown as one uniform schedule (no plot)
UNIFORM_TOLERANCE = 0.005
#: rows of the compact schedule view (levels, or groups of consecutive blocks)
MAX_VIEW_ROWS = 8
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


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


def module_table(rows: list[BlockRow]) -> str:
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


def is_uniform(rows: list[BlockRow]) -> bool:
    """Whether every decoder block has (nearly) the same sparsity: a plot of it would be identical bars."""
    values = [r.sparsity for r in rows if r.index is not None] or [r.sparsity for r in rows]
    return max(values) - min(values) < UNIFORM_TOLERANCE


def _spans(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0–2, 5, 7–8"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][-1] + 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    return ", ".join(str(s[0]) if len(s) == 1 else f"{s[0]}–{s[-1]}" for s in spans)


def schedule_view(rows: list[BlockRow], resolved_range: Any = None) -> str:
    """The schedule in a few lines: one sentence for a uniform schedule; for a few distinct sparsities (the
    ``hessian`` schedule's levels) one row per sparsity with its blocks; else (a continuous schedule: ramp, OWL)
    the blocks in about ``MAX_VIEW_ROWS`` consecutive groups with their mean and range."""
    blocks = [r for r in rows if r.index is not None]
    if not blocks or is_uniform(rows):
        value = sum(r.sparsity for r in rows) / len(rows)
        return f"Every decoder block is at sparsity {value:.3f}."
    levels: dict[str, list[int]] = {}
    for row in blocks:
        levels.setdefault(f"{row.sparsity:.2f}", []).append(row.index)
    if len(levels) <= MAX_VIEW_ROWS:
        lines = ["| sparsity | decoder blocks |", "|---|---|"]
        lines += [f"| {value} | {_spans(levels[value])} |" for value in sorted(levels)]
    else:
        size = -(-len(blocks) // MAX_VIEW_ROWS)
        lines = ["| decoder blocks | mean sparsity | range |", "|---|---|---|"]
        for k in range(0, len(blocks), size):
            group = blocks[k: k + size]
            values = [r.sparsity for r in group]
            lines.append(f"| {_spans([r.index for r in group])} | {sum(values) / len(values):.3f} | "
                         f"{min(values):.3f}–{max(values):.3f} |")
    text = "\n".join(lines)
    if resolved_range:
        text = f"Per-block sparsity in [{resolved_range[0]:.3f}, {resolved_range[1]:.3f}]:\n\n" + text
    return text
