"""What the schedule stage is asked to do: :class:`ScheduleSpec`, built once from the run's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleSpec:
    """The options the schedule uses.

    ``sparsity``: the parameter-weighted mean target; ``schedule``: ``"hessian"``, ``"uniform"``, ``"owl"`` or
    ``"ramp"``; ``sparsity_range``: ``(lo, hi)``, or ``None`` for ``"auto"``; ``num_levels``: log-error levels of the
    ``hessian`` schedule; ``error_metric``: ``"fisher"`` (end-to-end damage estimated from one backward pass),
    ``"kl-alone"`` (measured end-to-end damage) or ``"obs"`` (the local OBS loss); ``probe_samples``: calibration
    windows the statistics are measured on; ``owl_m``, ``owl_lambda``: OWL's outlier threshold and spread;
    ``search_steps``: steps of the allocation search (0: none); ``seed``: of the search and of the labels the
    ``"fisher"`` estimate samples; ``block_size``, ``damp``: of the OBS solves the measurement and the search make (unstructured,
    unquantized)."""

    sparsity: float
    schedule: str = "hessian"
    sparsity_range: tuple[float, float] | None = None
    num_levels: int = 5
    error_metric: str = "fisher"
    probe_samples: int = 4
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    search_steps: int = 0
    seed: int = 0
    block_size: int = 128
    damp: float = 0.01

    @property
    def needs_statistics(self) -> bool:
        """Whether the schedule allocates from measured statistics (a dense pass over the probe windows first)."""
        return self.schedule in ("hessian", "owl") and self.sparsity > 0

    @property
    def measures_damage(self) -> bool:
        """Whether that pass also measures each block's end-to-end damage (the KL streams, or their estimate)."""
        return self.needs_statistics and self.schedule == "hessian" and self.error_metric != "obs"

    @property
    def estimates_damage(self) -> bool:
        """Whether the end-to-end damage is estimated from one backward pass (:mod:`.fisher`), not measured."""
        return self.measures_damage and self.error_metric == "fisher"
