"""The schedule of a run: from the measured statistics (:mod:`.statistics`) to one target sparsity per module,
with the allocators of :mod:`.allocators`. A layer is a decoder block: every module of a block gets the block's
sparsity.

``hessian`` (default): per block the damage curve ``D_b(s) = P_b · L_b(s)`` (``error_metric="fisher"`` or
``"kl-alone"``: ``L_b`` the block's summed OBS local loss curve, ``P_b`` its end-to-end damage over ``L_b(target)``;
``error_metric="obs"``: the paper's literal ``L_b`` alone); the damage at the target is clustered into log levels
(:func:`.allocators.level_schedule`) inside the range ``[lo, hi]``. ``sparsity_range="auto"`` takes the range
spanned by the damage-minimising allocation of those curves (:func:`.allocators.optimal_allocation`) searched
inside ``[target − 0.3, target + (1 − target)/3]`` (no block keeps less than 2/3 of the target's density), widened
to contain the target, and — when the damage was measured window by window (``"fisher"``) — shrunk toward the
target by the reliability of the blocks' damage differences across the probe windows (:func:`reliability`): a
damage profile that the probe windows do not agree on is noise of the calibration text, not a property of the
model, and an allocation fitted to it hurts other texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..pipeline.plan import CompressionPlan
from .allocators import level_schedule, optimal_allocation, owl_schedule, ramp_schedule, uniform_schedule
from .spec import ScheduleSpec
from .statistics import LayerStatistics

AUTO_SEARCH_HALF_WIDTH = 0.3  # "auto" ranges are searched from target − this, within [0, 0.99]
#: "auto" ranges end at most this fraction of the target's density above the target: no block keeps less than
#: 2/3 of the target's density (0.5 -> 0.667, 0.7 -> 0.8, 0.8 -> 0.867)
AUTO_DENSITY_CUT = 1 / 3
RAMP_DEFAULT_HALF_WIDTH = 0.1


@dataclass
class Allocation:
    """Per-module target sparsities, the per-module error estimates they were allocated from (empty when the
    schedule estimates none), the sparsity range used (``None`` when the schedule has none) and what the allocation
    search did (:mod:`.search`; ``None`` without it)."""

    targets: dict[str, float]
    estimates: dict[str, float]
    resolved_range: list[float] | None = None
    search: dict[str, Any] | None = None


def target_index(stats: LayerStatistics, sparsity: float) -> int:
    """The index of ``sparsity`` on the statistics' sparsity grid."""
    return int(round(sparsity * (len(stats.grid) - 1)))


def damage_curves(plan: CompressionPlan, spec: ScheduleSpec, stats: LayerStatistics) -> dict[int, Any]:
    """The ``hessian`` schedule's damage curve ``D_b(s)`` of every block ``b`` with compressed modules, on
    ``stats.grid``: ``P_b · L_b(s)`` with ``P_b = D_b / L_b(target)`` (``"fisher"``, ``"kl-alone"``), or the local
    OBS curve ``L_b`` itself (``"obs"``)."""
    t = target_index(stats, spec.sparsity)
    curves = {}
    for i, group in enumerate(plan.modules):
        if group:
            local = sum(stats.curves[n] for n in group)
            if spec.error_metric == "obs":
                curves[i] = local
            else:
                assert stats.block_damage is not None
                curves[i] = stats.block_damage[i] / max(float(local[t]), 1e-30) * local
    return curves


def reliability(window_damage: list[list[float]]) -> float:
    """How much of the spread of the blocks' log-damage is signal, ``ρ = max(0, 1 − σ²_noise / σ²_blocks)``:
    ``σ²_blocks`` the variance over blocks of ``m_b = mean_w log D_{b,w}``, ``σ²_noise`` the mean over blocks of the
    variance of ``m_b`` across the probe windows (``var_w log D_{b,w} / p``) — the James–Stein factor that shrinks
    the blocks' differences toward none. 1 with a single probe window or block (no noise estimate)."""
    logs = [[math.log(max(d, 1e-30)) for d in row] for row in window_damage]
    if len(logs) < 2 or min(len(row) for row in logs) < 2:
        return 1.0
    means = [sum(row) / len(row) for row in logs]
    grand = sum(means) / len(means)
    between = sum((m - grand) ** 2 for m in means) / (len(means) - 1)
    noise = sum(sum((x - m) ** 2 for x in row) / (len(row) - 1) / len(row) for row, m in zip(logs, means)) / len(logs)
    return max(0.0, 1.0 - noise / between) if between > 0 else 0.0


def allocate_sparsities(plan: CompressionPlan, spec: ScheduleSpec, stats: LayerStatistics | None) -> Allocation:
    """The schedule's per-module sparsities; parameter-weighted, they average exactly to ``spec.sparsity``."""
    sizes = plan.sizes
    s = spec.sparsity
    if spec.schedule == "uniform" or s == 0:
        return Allocation(uniform_schedule(sizes, s), {})
    layers = {f"block.{i}": list(group) for i, group in enumerate(plan.modules) if group}
    layer_sizes = {layer: sum(sizes[n] for n in names) for layer, names in layers.items()}
    manual = spec.sparsity_range

    def per_module(per_layer: dict[str, float]) -> dict[str, float]:
        return {n: per_layer[layer] for layer, names in layers.items() for n in names}

    if spec.schedule == "ramp":
        lo, hi = manual or (max(0.0, s - RAMP_DEFAULT_HALF_WIDTH), min(0.99, s + RAMP_DEFAULT_HALF_WIDTH))
        return Allocation(per_module(ramp_schedule(layer_sizes, s, lo, hi)), {})
    assert stats is not None, "the owl and hessian schedules allocate from measured statistics"
    if spec.schedule == "owl":
        ratios = {f"block.{i}": stats.owl_ratio_block[i] for i, g in enumerate(plan.modules) if g}
        lam = (manual[1] - manual[0]) / 2 if manual else spec.owl_lambda
        return Allocation(per_module(owl_schedule(ratios, layer_sizes, s, lam)), per_module(ratios))
    # hessian
    t = target_index(stats, s)
    local = {layer: sum(stats.curves[n] for n in names) for layer, names in layers.items()}
    curves = {f"block.{i}": c for i, c in damage_curves(plan, spec, stats).items()}
    errors = {layer: max(float(c[t]), 1e-30) for layer, c in curves.items()}
    estimates = {n: errors[layer] * float(stats.curves[n][t]) / (float(local[layer][t]) or 1.0)
                 for layer, names in layers.items() for n in names}
    if manual:
        lo, hi = manual
    else:
        box = (max(0.0, s - AUTO_SEARCH_HALF_WIDTH), min(0.99, s + AUTO_DENSITY_CUT * (1 - s)))
        grid = stats.grid.tolist()
        best = optimal_allocation({k: (grid, c.tolist()) for k, c in curves.items()}, layer_sizes, s, *box)
        lo, hi = min(min(best.values()), s), max(max(best.values()), s)
        if stats.window_damage:  # shrunk toward the target as far as the blocks' differences are noise
            rho = reliability([stats.window_damage[i] for i, g in enumerate(plan.modules) if g])
            lo, hi = s - rho * (s - lo), s + rho * (hi - s)
    per_layer = level_schedule(errors, layer_sizes, s, lo, hi, spec.num_levels)
    return Allocation(per_module(per_layer), estimates, [lo, hi])
