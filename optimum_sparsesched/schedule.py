"""Layer-wise sparsity schedules: how the target sparsity is spread over the compressed modules.

A schedule maps every compressed module (by qualified name) to its own sparsity ``s_l`` such that the
parameter-weighted mean ``Σ_l n_l s_l / Σ_l n_l`` equals the target ``s``.

- ``uniform``: ``s_l = s`` for every module (SparseGPT's default).
"""

from __future__ import annotations

from typing import Mapping


def uniform_schedule(module_sizes: Mapping[str, int], sparsity: float) -> dict[str, float]:
    """Every module gets the target sparsity."""
    return {name: sparsity for name in module_sizes}


def weighted_mean(sparsities: Mapping[str, float], module_sizes: Mapping[str, int]) -> float:
    """Parameter-weighted mean sparsity ``Σ n_l s_l / Σ n_l``."""
    total = sum(module_sizes[n] for n in sparsities)
    return sum(module_sizes[n] * s for n, s in sparsities.items()) / total
