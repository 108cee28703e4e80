"""What a compression run achieved, kept apart from its options (:class:`.config.SparseScheduleConfig`).

``config.results`` travels in ``config.json`` under ``quantization_config.results``; none of it changes how a model
is compressed, so none of it enters the resume fingerprint. The quantization grids of the compressed modules
(``grids``) stay in memory only: the weight files store them (:mod:`.formats`), and a loaded compact checkpoint puts
them back here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .obs.grid import Grid

#: the result fields, also accepted at the top level of a saved config (checkpoints of optimum-sparsesched 0.1.0)
RESULT_FIELDS = ("layer_sparsities", "layer_errors", "resolved_range", "eval_results", "search", "measured")


@dataclass
class CompressionResults:
    """``layer_sparsities``: fraction of zero weights of every compressed module (qualified name -> float);
    ``layer_errors``: the schedule's per-module error estimates (or the OBS loss of every module when the schedule
    estimates none); ``resolved_range``: the ``[lo, hi]`` sparsity range the schedule used (``"auto"`` resolved),
    ``None`` when it has none; ``eval_results``: evaluations recorded with
    :func:`optimum_sparsesched.record_eval_result` (shown in the model card); ``search``: with ``search_steps``, what
    the allocation search did (``kl_before``, ``kl_after``, ``steps``, ``evaluations``, ``blocks_pruned``);
    ``measured``: what the last save measured on the tensors it wrote (``sparsity``: the parameter-weighted zero
    fraction of the compressed modules; ``pattern``: the ``N:M`` pattern when every compressed weight has it, else
    ``None``), which the model card describes;
    ``grids``: with ``bits``, the grid of every compressed module found by the solve or read from a checkpoint (not
    saved in ``config.json``; a streamed run hands them to the writer block by block and keeps none)."""

    layer_sparsities: dict[str, float] = field(default_factory=dict)
    layer_errors: dict[str, float] = field(default_factory=dict)
    resolved_range: list[float] | None = None
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    grids: dict[str, Grid] = field(default_factory=dict, repr=False, compare=False)

    @property
    def compressed(self) -> bool:
        """Whether a run has filled these results (a model compressed in memory or loaded compressed)."""
        return bool(self.layer_sparsities)

    def to_dict(self) -> dict[str, Any]:
        """The saved fields (:data:`RESULT_FIELDS`), JSON-safe copies."""
        import copy

        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name in RESULT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CompressionResults":
        data = dict(data or {})
        unknown = set(data) - set(RESULT_FIELDS)
        if unknown:
            raise TypeError(f"results: unknown fields {sorted(unknown)}; allowed: {list(RESULT_FIELDS)}")
        return cls(layer_sparsities=dict(data.get("layer_sparsities") or {}),
                   layer_errors=dict(data.get("layer_errors") or {}),
                   resolved_range=list(data["resolved_range"]) if data.get("resolved_range") is not None else None,
                   eval_results=[dict(r) for r in data.get("eval_results") or []],
                   search=dict(data["search"]) if data.get("search") else None,
                   measured=dict(data["measured"]) if data.get("measured") else None)
