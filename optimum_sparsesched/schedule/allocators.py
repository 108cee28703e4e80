"""Layer-wise sparsity schedules: how the target sparsity is spread over the compressed layers.

A schedule maps every layer ``l`` (a decoder block) with ``n_l``
weights to a sparsity ``s_l`` inside a range ``[lo, hi]`` such that the parameter-weighted mean
``Σ n_l s_l / Σ n_l`` equals the target ``s``. All allocators here are pure functions of per-layer statistics:

- ``uniform``: ``s_l = s``.
- ``ramp``: linear in depth from ``lo`` (first layer) to ``hi`` (last), then shifted onto the target.
- ``owl`` (Yin et al., 2024): layer outlier ratio ``D_l`` = fraction of Wanda scores ``|W_ij|·||X_j||`` above
  ``M`` × their layer mean; ratios min-max scaled to ``[0, 2λ]``; ``s_l = s - (r_l - mean r)`` (more outliers,
  less pruning).
- ``levels`` (Zhang et al., arXiv 2409.20094): the log of each layer's estimated damage is clustered into
  ``num_levels`` levels (1-D k-means, so a few outlying layers get their own levels instead of squeezing the bulk
  into one); the lowest-damage level gets ``hi``, the highest ``lo``, the levels between are spaced linearly, then
  all are shifted (and clipped to the range) onto the target.
- ``optimal_allocation``: minimises the predicted damage ``Σ_l D_l(s_l)`` subject to the target mean and the
  range, for convex per-layer damage curves, by bisection on the Lagrange multiplier. It is used to choose the
  range automatically (``sparsity_range="auto"``).

Why the level map is linear in log-damage: if damage grows exponentially with sparsity, ``D_l(s) = c_l e^{α s}``
(what OBS curves and perplexity look like over the useful range), the stationarity condition of the constrained
minimum, ``D_l'(s_l) = μ n_l``, gives ``s_l = const - (1/α) log c_l``: sparsity falls linearly with log-damage, with
slope ``1/α``. The levels quantise that line (robust to noisy estimates); the range sets its slope.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


def weighted_mean(sparsities: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Parameter-weighted mean sparsity ``Σ n_l s_l / Σ n_l``."""
    total = sum(sizes[n] for n in sparsities)
    return sum(sizes[n] * s for n, s in sparsities.items()) / total


def fit_to_target(base: Mapping[str, float], sizes: Mapping[str, int], target: float, lo: float,
                  hi: float) -> dict[str, float]:
    """Shift every ``base`` sparsity by one constant ``t`` and clip to ``[lo, hi]`` so that the weighted mean is
    ``target``: ``s_l = clip(base_l + t, lo, hi)``. The mean is continuous and non-decreasing in ``t``, so ``t`` is
    found by bisection; the order of the layers (monotonicity in the estimate) is preserved."""
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise ValueError(f"sparsity_range: ({lo}, {hi}) cannot reach the target sparsity {target}")
    names = list(base)
    b = torch.tensor([base[n] for n in names], dtype=torch.float64)
    w = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    w = w / w.sum()

    def mean_at(t: float) -> float:
        return float((w * (b + t).clamp(lo, hi)).sum())

    left, right = lo - float(b.max()) - 1.0, hi - float(b.min()) + 1.0
    for _ in range(200):
        mid = (left + right) / 2
        if mean_at(mid) < target:
            left = mid
        else:
            right = mid
    s = (b + (left + right) / 2).clamp(lo, hi)
    return {n: float(v) for n, v in zip(names, s)}


def uniform_schedule(sizes: Mapping[str, int], target: float) -> dict[str, float]:
    """Every layer gets the target sparsity."""
    return {name: float(target) for name in sizes}


def ramp_schedule(sizes: Mapping[str, int], target: float, lo: float, hi: float) -> dict[str, float]:
    """Linear in depth (the mapping's order): ``lo`` for the first layer, ``hi`` for the last, fitted to the target."""
    names = list(sizes)
    k = max(len(names) - 1, 1)
    base = {n: lo + (hi - lo) * i / k for i, n in enumerate(names)}
    return fit_to_target(base, sizes, target, lo, hi)


def owl_schedule(outlier_ratios: Mapping[str, float], sizes: Mapping[str, int], target: float,
                 lam: float) -> dict[str, float]:
    """OWL: ratios min-max scaled to ``[0, 2λ]``, ``s_l = target - (r_l - mean r)``, fitted to the weighted target
    inside ``[target - λ, target + λ]`` (clipped to ``[0, 0.99]``)."""
    names = list(outlier_ratios)
    r = torch.tensor([outlier_ratios[n] for n in names], dtype=torch.float64)
    spread = float(r.max() - r.min())
    scaled = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    base = {n: target - float(v - scaled.mean()) for n, v in zip(names, scaled)}
    return fit_to_target(base, sizes, target, max(0.0, target - lam), min(0.99, target + lam))


def log_levels(errors: Mapping[str, float], num_levels: int) -> dict[str, int]:
    """Cluster ``log(error)`` into at most ``num_levels`` levels, numbered by increasing error (0 = lowest), by 1-D
    k-means (Lloyd, initialised at quantiles); the used levels are renumbered 0..k-1."""
    names = list(errors)
    logs = torch.tensor([math.log(max(errors[n], 1e-30)) for n in names], dtype=torch.float64)
    if num_levels <= 1 or float(logs.max() - logs.min()) < 1e-12:
        return {n: 0 for n in names}
    centers = torch.quantile(logs, torch.linspace(0, 1, num_levels, dtype=torch.float64)).unique()
    for _ in range(100):
        assign = (logs.unsqueeze(1) - centers.unsqueeze(0)).abs().argmin(1)
        new = torch.stack([logs[assign == k].mean() if (assign == k).any() else centers[k]
                           for k in range(len(centers))])
        if torch.allclose(new, centers):
            break
        centers = new
    used = sorted(set(assign.tolist()), key=lambda k: float(centers[k]))
    rank = {k: r for r, k in enumerate(used)}
    return {n: rank[int(a)] for n, a in zip(names, assign)}


def level_schedule(errors: Mapping[str, float], sizes: Mapping[str, int], target: float, lo: float, hi: float,
                   num_levels: int) -> dict[str, float]:
    """The paper's allocation: low-error levels get high sparsity, high-error levels low sparsity, linearly
    across ``[lo, hi]``, then shifted (and clipped) onto the weighted target. Equal errors give uniform."""
    levels = log_levels(errors, num_levels)
    top = max(levels.values())
    if top == 0:
        return uniform_schedule(sizes, target)
    base = {n: hi - (hi - lo) * k / top for n, k in levels.items()}
    return fit_to_target(base, sizes, target, lo, hi)


def optimal_allocation(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], sizes: Mapping[str, int],
                       target: float, lo: float, hi: float) -> dict[str, float]:
    """Minimise ``Σ_l D_l(s_l)`` subject to ``Σ n_l s_l = target Σ n_l`` and ``lo <= s_l <= hi``.

    ``curves[l] = (grid, damage)``: the predicted damage of layer ``l`` at the sparsities of ``grid`` (increasing,
    convex in practice). For a multiplier ``μ`` each layer independently takes ``argmin_s D_l(s) - μ n_l s`` on its
    grid; the weighted mean grows with ``μ``, and bisection on ``μ`` brackets the target. The result is fitted
    exactly onto the target with :func:`fit_to_target`."""
    names = list(curves)
    grids = {n: torch.tensor(curves[n][0], dtype=torch.float64) for n in names}
    damages = {n: torch.tensor(curves[n][1], dtype=torch.float64) for n in names}
    inside = {n: (grids[n] >= lo - 1e-12) & (grids[n] <= hi + 1e-12) for n in names}
    total = sum(sizes[n] for n in names)

    def pick(mu: float) -> dict[str, float]:
        out = {}
        for n in names:
            obj = damages[n] - mu * sizes[n] / total * grids[n]
            obj = torch.where(inside[n], obj, torch.full_like(obj, math.inf))
            out[n] = float(grids[n][int(torch.argmin(obj))])
        return out

    scale = max(float(d.abs().max()) for d in damages.values()) * len(names) / max(hi - lo, 1e-6) * 1e3 + 1.0
    left, right = 0.0, scale
    for _ in range(100):
        mid = (left + right) / 2
        if weighted_mean(pick(mid), sizes) < target:
            left = mid
        else:
            right = mid
    return fit_to_target(pick(right), sizes, target, lo, hi)
