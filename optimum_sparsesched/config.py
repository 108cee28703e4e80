"""`SparseScheduleConfig`: every option of a compression run, validated at construction.

The config is a transformers `QuantizationConfigMixin` registered under ``quant_method="sparse_schedule"``, so it
travels in ``config.json`` of a compressed checkpoint. What a run achieved is kept apart, in ``config.results``
(:class:`.results.CompressionResults`); :meth:`SparseScheduleConfig.options_dict` is the options alone, and the part of
them that decides the compressed weights is :meth:`SparseScheduleConfig.fingerprint_options`. The stages below the
block loop never see the config: each takes the typed spec of what it uses, built here (``plan_spec``,
``schedule_spec``, ``prune_spec``, ``reconstruct_spec``, ``residency_spec``, ``export_spec``). What a calibration
``dataset`` is, and how it is described without a local path, is :class:`.pipeline.calibration.CalibrationSource`'s.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

from transformers.utils.quantization_config import QuantizationConfigMixin

from .config_checks import (CHECKS, ERROR_METRICS, EXPORT_FORMATS, PRESETS, SCHEDULES, SOLVERS, SUPPORTED_BITS,
                            invalid, is_number, parse_pattern)
from .formats.spec import ExportSpec
from .obs.reconstruct import ReconstructSpec
from .obs.spec import PruneSpec
from .pipeline.calibration import CalibrationSource, describe_tokenizer
from .pipeline.plan import PlanSpec
from .pipeline.residency import ResidencySpec
from .pipeline.sizes import parse_memory_size
from .results import RESULT_FIELDS, CompressionResults
from .schedule.spec import ScheduleSpec

QUANT_METHOD = "sparse_schedule"
#: options that decide where and how a run works or saves, not the compressed weights: left out of the fingerprint
#: (``dataset`` and ``tokenizer`` enter it through the calibration token windows they produce)
OUTPUT_NEUTRAL_OPTIONS = ("checkpoint_dir", "max_device_memory", "export_format", "dataset", "tokenizer")
#: options that are gone, with why; a saved config that has them still loads
RETIRED_OPTIONS = {"granularity": "removed in 0.2 (every module of a block gets the block's sparsity)",
                   "true_sequential": "removed in 0.4: measured neutral to negative at equal cost with the refit and "
                                      "ADMM solvers (benchmarks/RESULTS.md), and on in no preset"}
#: options that name a place on this machine: never written into config.json, a model card or an upload
LOCAL_OPTIONS = ("checkpoint_dir",)
#: options of loading a saved checkpoint, not of compressing: merged into its config by transformers
#: (``get_loading_attributes``), refused when compressing, never saved
LOADING_OPTIONS = ("run_compressed",)
#: key of ``config.json`` that keeps this package's config when ``quantization_config`` holds another format's
#: (``export_format="compressed-tensors"``)
SAVED_CONFIG_KEY = "sparse_schedule_config"


def saved_config_dict(config_json: Any) -> dict[str, Any] | None:
    """This package's config as saved in a checkpoint's ``config.json`` (a dict), whatever ``export_format`` wrote
    it; ``None`` when the checkpoint was not compressed by this package."""
    if not isinstance(config_json, dict):
        return None
    for qc in (config_json.get("quantization_config"), config_json.get(SAVED_CONFIG_KEY)):
        if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
            return qc
    return None


class SparseScheduleConfig(QuantizationConfigMixin):
    """Options of a SparseGPT compression run with a layer-wise sparsity schedule.

    Args:
        sparsity: target fraction of zeros over all compressed weights, parameter-weighted, ``0 <= s < 1``.
        schedule: how the target is spread over layers (default ``"hessian"``; ``"uniform"`` with a ``pattern``):
            ``"hessian"`` (OBS loss curves from H⁻¹ scaled by each block's measured end-to-end damage, log-level
            clustering), ``"uniform"``, ``"owl"`` (outlier-weighted) or ``"ramp"`` (linear in depth).
        pattern: ``None`` (unstructured) or ``"N:M"``: N zeros in every M consecutive inputs of each output row
            (requires ``sparsity == N/M``).
        bits, group_size, sym: ``None`` (no quantization), 4 or 8: GPTQ quantization of the kept weights in the same
            OBS pass, on grids over ``group_size`` inputs (``-1``: one per output row), symmetric or min/max.
        dataset: calibration text: a path (``str`` or ``pathlib.Path``) to a UTF-8 ``.txt`` file or a folder of
            them, a list of strings, a ``datasets.Dataset`` with a ``"text"`` column, or a hub name
            (``"wikitext2"``, ``"c4"``, needs network). config.json records a local file by its name and SHA-256.
        tokenizer: tokenizer object or name/path; ``None`` uses the model's own path.
        num_samples, seq_len, seed: ``num_samples`` (at most 65536) random windows of ``seq_len`` tokens, drawn with
            ``seed`` (-2**63 <= seed < 2**64, torch.Generator's range).
        damp: Hessian damping, ``damp * mean(diag H)`` on the diagonal (escalated on a failed Cholesky), ``0 < damp
            <= 1``; block_size: OBS column block width (lazy batch updates, adaptive masks per block).
        modules_to_not_convert: module names (or name suffixes) left untouched; ``lm_head`` by default.
        sparsity_range: ``(lo, hi)`` with ``0 <= lo <= sparsity <= hi < 1``, or ``"auto"`` (``"hessian"``: the span of
            the damage-minimising allocation of the measured curves; ``"ramp"``: ``sparsity ± 0.1``).
        num_levels: log-error levels of the ``"hessian"`` schedule (1 = uniform).
        error_metric: each block's damage pruned alone: ``"fisher"`` (from one backward pass, :mod:`.schedule.fisher`),
            ``"kl-alone"`` (KL at the logits, ``L²/2`` block forwards) or ``"obs"`` (the paper's local loss).
        probe_samples: calibration windows the schedule's statistics are measured on (the first; at most all).
        checkpoint_dir: folder where every finished block is saved; a run with the same options, data and model
            (weights included) resumes from the last finished block. Never written into config.json.
        max_device_memory: byte budget on the compute device: ``None`` (no cap), an int or ``"2GiB"``/``"512MB"``; a
            block whose working set exceeds it is refused before any work (:mod:`.pipeline.residency`).
        export_format: ``"compact"`` (bitmask + values or packed codes; needs ``import optimum_sparsesched``),
            ``"dense"`` (weights with zeros) or ``"compressed-tensors"`` (pack-quantized, requires ``bits``).
        owl_m, owl_lambda: OWL's outlier threshold M and sparsity spread λ.
        preset: fills what is not given of ``solver``, ``search_steps``, ``reconstruct_epochs``: ``"default"`` (refit),
            ``"quality"`` (admm, 8 search steps, 3 epochs) or ``"sparsegpt"`` (the paper's solver alone).
        solver: ``"sparsegpt"`` (the OBS scan), ``"refit"`` (its mask, kept weights refitted exactly) or ``"admm"``
            (mask searched by ADMM, as ALPS, then refitted); kept per layer only when below the scan's loss.
        search_steps: steps of the allocation search refining the ``hessian`` schedule by the KL of the pruned
            model on the probe windows (:mod:`.schedule.search`); 0 = none.
        reconstruct_epochs, reconstruct_lr: epochs of block reconstruction after each block (Adam on the kept
            weights, mask fixed, toward the dense block's outputs; kept only when it lowers the block's error;
            :mod:`.obs.reconstruct`), 0 = off, and its learning rate (cosine decay).
        run_compressed: a loading option (merged into a saved checkpoint's config): True/``"compact"`` (decoded in
            each forward, :mod:`.formats.compressed_linear`), ``"int4"`` or ``"sparse"`` (``.formats.*_kernel``).
        reconstruct_target: what the reconstruction fits: ``"dense"`` (each block's output in the dense model, a
            second stream of hidden states) or ``"local"`` (the dense block on the compressed inputs: no stream).
        results: what a run achieved (:class:`.results.CompressionResults`, or its dict as saved); empty before.
    """

    def __init__(self, sparsity: float = 0.5, schedule: str | None = None, pattern: str | None = None,
                 bits: int | None = None, group_size: int = 128, sym: bool = False, dataset: Any = "wikitext2",
                 tokenizer: Any = None, num_samples: int = 128, seq_len: int = 2048, seed: int = 0,
                 damp: float = 0.01, block_size: int = 128, modules_to_not_convert: Sequence[str] | None = ("lm_head",),
                 sparsity_range: Any = "auto", num_levels: int = 5, error_metric: str = "fisher",
                 probe_samples: int = 4, checkpoint_dir: str | None = None, max_device_memory: int | str | None = None,
                 export_format: str = "compact", owl_m: float = 5.0, owl_lambda: float = 0.08,
                 preset: str = "default", solver: str | None = None, search_steps: int | None = None,
                 reconstruct_epochs: int | None = None, reconstruct_lr: float = 1e-3, reconstruct_target: str = "dense",
                 run_compressed: bool | str = False,
                 results: CompressionResults | dict[str, Any] | None = None, **kwargs: Any) -> None:
        options = {k: v for k, v in locals().items() if k in self._fields()}
        self.quant_method = QUANT_METHOD
        self.__dict__.update(options)
        for key in ("dataset", "tokenizer", "checkpoint_dir"):  # a pathlib.Path is kept as its string
            if isinstance(getattr(self, key), os.PathLike):
                setattr(self, key, os.fspath(getattr(self, key)))
        names = modules_to_not_convert  # a bare string is one module name (not its letters), None is empty
        self.modules_to_not_convert = ([] if names is None else [names] if isinstance(names, str)
                                       else list(names) if isinstance(names, (list, tuple, set, frozenset)) else names)
        if isinstance(sparsity_range, (list, tuple)):
            self.sparsity_range = list(sparsity_range)
        self.results = results if isinstance(results, CompressionResults) else CompressionResults.from_dict(results)
        kwargs.pop("quant_method", None)
        for key in set(kwargs) & set(RETIRED_OPTIONS):
            raise ValueError(f"SparseScheduleConfig: `{key}` was {RETIRED_OPTIONS[key]}; leave it out")
        if kwargs:
            raise TypeError(f"SparseScheduleConfig got unknown options: {sorted(kwargs)}")
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Check every option; raise a ValueError naming the option, its value and what is allowed."""
        if self.schedule is None:  # default: the Hessian schedule; N:M patterns are uniform by construction
            self.schedule = "uniform" if self.pattern is not None else "hessian"
        preset = PRESETS.get(self.preset) if isinstance(self.preset, str) else None
        if preset is not None:  # what the preset fills in (the search needs the hessian schedule and a target)
            self.solver = preset["solver"] if self.solver is None else self.solver
            if self.reconstruct_epochs is None:
                self.reconstruct_epochs = preset["reconstruct_epochs"]
            if self.search_steps is None:
                searchable = self.schedule == "hessian" and is_number(lambda v: v > 0)(self.sparsity)
                self.search_steps = preset["search_steps"] if searchable else 0
        for name, ok, allowed in CHECKS:
            if not ok(getattr(self, name)):
                value = getattr(self, name)
                raise invalid(name, value if isinstance(value, (str, int, float, list, type(None))) else
                           type(value).__name__, allowed)
        for name in ("sparsity", "damp", "reconstruct_lr"):
            setattr(self, name, float(getattr(self, name)))
        if self.search_steps and self.schedule != "hessian":
            raise invalid("search_steps", self.search_steps, f"0 with schedule={self.schedule!r} (the search "
                          "refines the 'hessian' schedule's allocation)")
        self._check_range()
        nm = parse_pattern(self.pattern)
        if nm is not None:
            self.pattern = f"{nm[0]}:{nm[1]}"
            if self.schedule != "uniform":
                raise invalid("schedule", self.schedule, f"'uniform' when pattern={self.pattern!r} (every row of every "
                           "module then has exactly N/M zeros)")
            if abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
                raise invalid("sparsity", self.sparsity, f"{nm[0] / nm[1]} (= N/M) when pattern={self.pattern!r}")
        if self.export_format == "compressed-tensors" and self.bits is None:
            raise invalid("export_format", self.export_format, "'compact' or 'dense' when bits=None "
                       "('compressed-tensors' stores the INT4/INT8 pack-quantized layout, so it needs bits=4 or 8)")
        CalibrationSource(self.dataset).check()
        parse_memory_size(self.max_device_memory)

    def _check_range(self) -> None:
        r = self.sparsity_range
        if r == "auto":
            return
        allowed = f'"auto" or (lo, hi) with 0 <= lo <= sparsity={self.sparsity} <= hi < 1'
        if not isinstance(r, list) or len(r) != 2 or not all(is_number(lambda v: True)(x) for x in r):
            raise invalid("sparsity_range", r, allowed)
        lo, hi = float(r[0]), float(r[1])
        if not (0 <= lo <= hi < 1) or not (lo - 1e-9 <= self.sparsity <= hi + 1e-9):
            raise invalid("sparsity_range", r, allowed)
        self.sparsity_range = [lo, hi]

    # ------------------------------------------------------------------ derived: the stages' specs
    @property
    def max_device_memory_bytes(self) -> int | None:
        """``max_device_memory`` in bytes (``None``: no cap)."""
        return parse_memory_size(self.max_device_memory)

    @property
    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern as integers, or None for unstructured sparsity."""
        return parse_pattern(self.pattern)

    def plan_spec(self) -> PlanSpec:
        return PlanSpec(tuple(self.modules_to_not_convert), self.seq_len, self.nm)

    def schedule_spec(self) -> ScheduleSpec:
        manual = tuple(self.sparsity_range) if self.sparsity_range != "auto" else None
        return ScheduleSpec(self.sparsity, self.schedule, manual, self.num_levels, self.error_metric,
                            self.probe_samples, self.owl_m, self.owl_lambda, self.search_steps, self.seed,
                            self.block_size, self.damp)

    def prune_spec(self, sparsity: float) -> PruneSpec:
        """The OBS solve of one module at ``sparsity``."""
        return PruneSpec(sparsity, self.nm, self.bits, self.group_size, self.sym, self.block_size, self.damp,
                         self.solver)

    def reconstruct_spec(self) -> ReconstructSpec:
        return ReconstructSpec(self.reconstruct_epochs, self.reconstruct_lr, self.seed, self.bits, self.group_size,
                               self.reconstruct_target)

    def residency_spec(self) -> ResidencySpec:
        return ResidencySpec(self.seq_len, self.block_size, int(self.schedule_spec().measures_damage),
                             bool(self.reconstruct_epochs), self.max_device_memory_bytes)

    def export_spec(self) -> ExportSpec:
        return ExportSpec(self.export_format, self.bits, self.group_size, self.sym)

    # ------------------------------------------------------------------ serialization
    def options_dict(self) -> dict[str, Any]:
        """Every option, JSON-safe and free of local paths (this dict is what config.json, the model card and an
        upload hold): objects (tokenizer, in-memory datasets) are replaced by descriptions, a local calibration file
        or folder by its name and the SHA-256 of its text, a local tokenizer path by its folder name, and
        :data:`LOCAL_OPTIONS` (``checkpoint_dir``) are left out."""
        out: dict[str, Any] = {}
        for key, value in list(self.__dict__.items()):
            if key.startswith("_") or key == "results" or key in LOCAL_OPTIONS or key in LOADING_OPTIONS:
                continue
            if key == "tokenizer" and value is not None:
                value = describe_tokenizer(value)
            elif key == "dataset":
                value = self._dataset_description()
            out[key] = value
        return out

    def get_loading_attributes(self) -> dict[str, Any]:
        """What ``from_pretrained(saved, quantization_config=SparseScheduleConfig(...))`` changes in the saved config
        (transformers' ``merge_quantization_configs``): the :data:`LOADING_OPTIONS`."""
        return {key: getattr(self, key) for key in LOADING_OPTIONS}

    def check_compression_options(self) -> None:
        """Before compressing: a loading option is refused (``ValueError`` naming it)."""
        if self.run_compressed:
            raise invalid("run_compressed", self.run_compressed, "False when compressing (a loading option: save, then from_pretrained("
                          "folder, quantization_config=SparseScheduleConfig(run_compressed=True)))")

    def _dataset_description(self) -> str:
        """The description of ``dataset``, computed once per dataset (a local file is hashed once)."""
        cached = getattr(self, "_described", None)
        key = self.dataset if isinstance(self.dataset, str) else id(self.dataset)
        if cached is None or cached[0] != key:
            self._described = (key, CalibrationSource(self.dataset).describe())
        return self._described[1]

    def fingerprint_options(self) -> dict[str, Any]:
        """The options that decide the compressed weights (all but :data:`OUTPUT_NEUTRAL_OPTIONS`)."""
        return {k: v for k, v in self.options_dict().items() if k not in OUTPUT_NEUTRAL_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: the options, and the results under ``"results"``."""
        return {**self.options_dict(), "results": self.results.to_dict()}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from config.json. A saved dataset description is not a dataset: keep it for the record but do not
        validate it (a reloaded checkpoint never calibrates again). Configs of older versions (results at the top
        level, retired options, no preset or reconstruction) load too."""
        config_dict = {k: v for k, v in config_dict.items() if k not in RETIRED_OPTIONS}
        results = dict(config_dict.pop("results", None) or {})
        for key in RESULT_FIELDS:
            if key in config_dict:
                results.setdefault(key, config_dict.pop(key))
        if config_dict.get("error_metric") == "kl":  # retired: its checkpoints keep a valid record
            config_dict["error_metric"] = "kl-alone"
        config_dict.setdefault("preset", "sparsegpt")  # saved before presets existed: those runs used the scan
        config_dict.setdefault("reconstruct_epochs", 0)  # saved before the option: no block reconstruction
        dataset = config_dict.get("dataset")
        if isinstance(dataset, str) and (CalibrationSource.is_record(dataset) or not os.path.exists(dataset)):
            config_dict["dataset"] = "wikitext2"  # a description, or a path gone since: kept as the record below
        config = cls(**{k: v for k, v in config_dict.items() if k in cls._fields() or k == "quant_method"},
                     results=results)
        if dataset is not None:
            config.dataset = dataset
        for key, value in list(kwargs.items()):
            if hasattr(config, key):
                setattr(config, key, value)
                kwargs.pop(key)
        return (config, kwargs) if return_unused_kwargs else config

    @staticmethod
    def _fields() -> set[str]:
        return set(inspect.signature(SparseScheduleConfig.__init__).parameters) - {"self", "kwargs", "results"}
