"""Budgeted search of the per-block sparsities, warm-started from the schedule (``search_steps > 0``).

EvoPress (Sieberling et al., ICML 2025) searches per-layer compression levels with the KL divergence of the
compressed model from the dense one as fitness, over a database of every layer pruned at every level, for hundreds
of generations. Here the search starts from the ``hessian`` schedule's allocation and prunes a block at a level only
when a candidate first needs it:

- state: one sparsity per decoder block; a move shifts ``δ`` (:data:`SEARCH_STEP`) of sparsity from one block to
  another block with as many compressed weights, so the parameter-weighted mean stays exactly on the target and
  every block stays inside ``[0, 0.99]``;
- proposals: per step :data:`OFFSPRING` moves (block ``i`` +δ, block ``j`` −δ), drawn with a generator seeded by
  ``seed``: half from the moves that the schedule's damage model ``D_b(s)`` predicts to lower the total
  damage most (``D_j(s_j) − D_j(s_j−δ) − (D_i(s_i+δ) − D_i(s_i))``), half uniformly;
- fitness: the mean per-token ``KL(p_dense ‖ p_candidate)`` of the next-token distributions on the schedule's probe
  windows (at :data:`FITNESS_POSITIONS` positions per window), with every block pruned at its level by SparseGPT on
  the Hessians of its dense inputs, as the schedule's damage measurement prunes; the stream before the first
  changed block is reused from the parent;
- selection in two stages (as EvoPress): every offspring is scored on the first probe window, the best one on all of
  them, and it replaces the parent when its KL is lower.

Deterministic for a seed. The KL of the schedule's allocation and of the result are returned (and recorded in
``results.search``); the compression itself then runs at the searched sparsities.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..obs.inverse import InverseHessian
from ..obs.prune import prune
from ..obs.spec import PruneSpec
from ..pipeline.blocks import BlockInputs, find_decoder_blocks, head_and_embeddings_on
from ..pipeline.hessians import collect_block_hessians
from ..pipeline.plan import CompressionPlan
from ..pipeline.sources import BlockSource, BlockVisit
from .allocate import Allocation, damage_curves
from .spec import ScheduleSpec
from .statistics import LayerStatistics, logits_from_last_hidden

SEARCH_STEP = 0.025  # δ: the sparsity moved between two blocks by one move
OFFSPRING = 4  # candidates per step
FITNESS_POSITIONS = 128  # positions per probe window at which the KL is measured
MAX_SPARSITY = 0.99
INVERSE_CACHE_BYTES = 2**30  # inverse Hessians kept between prunings of a block at different levels


@dataclass
class SearchOutcome:
    """The searched sparsity of every block, the KL before (the schedule's allocation) and after, and what it cost."""

    levels: list[float]
    kl_before: float
    kl_after: float
    steps: int
    evaluations: int
    blocks_pruned: int

    def record(self) -> dict[str, Any]:
        return {"kl_before": self.kl_before, "kl_after": self.kl_after, "steps": self.steps,
                "evaluations": self.evaluations, "blocks_pruned": self.blocks_pruned}


class AllocationSearch:
    """The search over one model (see the module docstring). ``dense_inputs[b]``: the probe windows' dense inputs of
    block ``b`` (``dense_inputs[L]``: the last block's dense outputs); ``curves[b]``: the schedule's damage curve of
    block ``b`` on ``grid``. Blocks are visited through ``source`` (offloaded or streamed weights are read once per
    visit; nothing is written back: the search never changes a block's weights)."""

    def __init__(self, model: nn.Module, plan: CompressionPlan, inputs: BlockInputs, windows: torch.Tensor,
                 dense_inputs: Sequence[Sequence[torch.Tensor]], curves: dict[int, torch.Tensor],
                 grid: torch.Tensor, spec: ScheduleSpec, device: torch.device,
                 source: BlockSource | None = None) -> None:
        self.model, self.plan, self.inputs, self.spec, self.device = model, plan, inputs, spec, device
        self.source = source or BlockSource(plan)
        self.windows = windows
        self.dense_inputs = dense_inputs
        self.curves, self.grid = curves, grid
        self.bank: dict[tuple[int, float], dict[str, torch.Tensor]] = {}
        self._inverses: OrderedDict[int, dict[str, InverseHessian]] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self.evaluations = 0
        seq_len = windows.shape[1]
        count = min(FITNESS_POSITIONS, seq_len - 1)
        self.positions = torch.linspace(0, seq_len - 2, count).round().long().unique()
        _, self.blocks = find_decoder_blocks(model)
        self.reference = [self._log_probs(w, dense_inputs[-1][w]) for w in range(len(windows))]

    # ------------------------------------------------------------------ pieces
    def _log_probs(self, w: int, final_hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities ``[positions, vocab]`` of window ``w`` from the last block's output."""
        ids = self.windows[w][self.positions].unsqueeze(0).to(self.device)
        hidden = final_hidden[:, self.positions].to(self.device)
        with head_and_embeddings_on(self.model, self.device):
            logits = logits_from_last_hidden(self.model, self.blocks, ids, hidden, self.inputs.returns_tuple)
        return torch.log_softmax(logits[0].float(), dim=-1)

    def inverses(self, visit: BlockVisit) -> dict[str, InverseHessian]:
        """The inverse Hessians of the visited block's modules on its dense inputs, by module name (one object per
        group reading the same input). They do not depend on the level, so they are kept, least recently used out
        first beyond :data:`INVERSE_CACHE_BYTES`: a block pruned at a new level costs its OBS scans only, not its
        probe forwards and factorisations again."""
        if visit.index in self._inverses:
            self._inverses.move_to_end(visit.index)
            return self._inverses[visit.index]
        accumulators = collect_block_hessians(visit, list(self.dense_inputs[visit.index]))
        shared = {id(a): InverseHessian(a.H, self.spec.damp) for a in dict.fromkeys(accumulators.values())}
        self._inverses[visit.index] = {n: shared[id(a)] for n, a in accumulators.items()}
        self._sizes[visit.index] = sum(2 * 4 * inverse.H.numel() for inverse in shared.values())  # H and factor
        while len(self._inverses) > 1 and sum(self._sizes.values()) > INVERSE_CACHE_BYTES:
            self._sizes.pop(self._inverses.popitem(last=False)[0])
        return self._inverses[visit.index]

    def pruned_weights(self, block: int, level: float) -> dict[str, torch.Tensor]:
        """Block ``block``'s compressed modules pruned at ``level`` on its dense inputs' Hessians (cached)."""
        key = (block, round(level, 6))
        if key not in self.bank:
            with self.source.visit(block, self.device, inputs=self.inputs) as visit:
                inverses = self.inverses(visit)
                spec = PruneSpec(level, block_size=self.spec.block_size, damp=self.spec.damp)
                self.bank[key] = {n: prune(visit.weight(n), inverses[n], spec).weight.cpu() for n in visit.modules}
        return self.bank[key]

    def stream(self, levels: Sequence[float], start: int, hidden: Sequence[torch.Tensor],
               windows: Sequence[int]) -> list[list[torch.Tensor]]:
        """Run blocks ``start…`` with their pruned weights on ``hidden`` (the inputs of block ``start`` for the given
        windows); returns the inputs of every block from ``start`` on and the final output (``[L - start + 1]``)."""
        out = [list(hidden)]
        for b in range(start, len(self.plan.blocks)):
            pruned = self.pruned_weights(b, levels[b])
            with self.source.visit(b, self.device, inputs=self.inputs) as visit, visit.swapped(pruned):
                out.append([visit.forward(h).to(h.device) for h in out[-1]])
        return out

    def kl(self, final: Sequence[torch.Tensor], windows: Sequence[int]) -> float:
        self.evaluations += 1
        total = 0.0
        for h, w in zip(final, windows):
            ref = self.reference[w]
            logq = self._log_probs(w, h)
            total += float((ref.exp() * (ref - logq)).sum(-1).mean())
        return total / len(windows)

    def damage(self, block: int, level: float) -> float:
        index = int(round(min(max(level, 0.0), 1.0) * (len(self.grid) - 1)))
        return float(self.curves[block][index])

    def proposals(self, levels: list[float], rng: random.Random) -> list[tuple[int, int]]:
        """``OFFSPRING`` distinct moves (i gets +δ, j gets −δ) between blocks of equal size."""
        sizes = [sum(m.weight.numel() for m in group.values()) for group in self.plan.modules]
        moves = [(i, j) for i in range(len(levels)) for j in range(len(levels))
                 if i != j and sizes[i] == sizes[j] and sizes[i] > 0
                 and levels[i] + SEARCH_STEP <= MAX_SPARSITY and levels[j] - SEARCH_STEP >= 0.0]
        if not moves:
            return []
        gain = {(i, j): (self.damage(j, levels[j]) - self.damage(j, levels[j] - SEARCH_STEP))
                - (self.damage(i, levels[i] + SEARCH_STEP) - self.damage(i, levels[i])) for i, j in moves}
        ranked = sorted(moves, key=lambda mv: (-gain[mv], mv))
        chosen = [mv for mv in ranked[: OFFSPRING // 2] if gain[mv] > 0]
        rest = [mv for mv in moves if mv not in chosen]
        chosen += rng.sample(rest, min(OFFSPRING - len(chosen), len(rest)))
        return chosen

    # ------------------------------------------------------------------ the search
    def run(self, start: Sequence[float], steps: int, seed: int) -> SearchOutcome:
        rng = random.Random(seed)
        levels = list(start)
        all_windows = list(range(len(self.windows)))
        parent = self.stream(levels, 0, [self.dense_inputs[0][w] for w in all_windows], all_windows)
        parent_kl = kl_before = self.kl(parent[-1], all_windows)
        done = 0
        for done in tqdm(range(1, steps + 1), desc="schedule: search", unit="step"):
            scored = []
            for i, j in self.proposals(levels, rng):
                child = list(levels)
                child[i] += SEARCH_STEP
                child[j] -= SEARCH_STEP
                first = min(i, j)
                final = self.stream(child, first, [parent[first][0]], [0])[-1]
                scored.append((self.kl(final, [0]), (i, j), child))
            if not scored:
                break
            _, (i, j), child = min(scored, key=lambda t: (t[0], t[1]))
            first = min(i, j)
            tail = self.stream(child, first, parent[first], all_windows)
            child_kl = self.kl(tail[-1], all_windows)
            if child_kl < parent_kl:
                levels, parent_kl = child, child_kl
                parent = parent[:first] + tail
        return SearchOutcome(levels, kl_before, parent_kl, done, self.evaluations, len(self.bank))


def search_allocation(model: nn.Module, plan: CompressionPlan, inputs: BlockInputs, windows: torch.Tensor,
                      stats: LayerStatistics, allocation: Allocation, spec: ScheduleSpec,
                      device: torch.device, source: BlockSource | None = None) -> Allocation:
    """``allocation`` (the ``hessian`` schedule's) refined by ``spec.search_steps`` steps of the search, with the
    statistics pass's dense inputs (``stats.dense_inputs``) and damage curves. Returns a new ``Allocation`` whose
    ``search`` records the outcome."""
    curves = damage_curves(plan, spec, stats)
    start = [allocation.targets[next(iter(group))] if group else 0.0 for group in plan.modules]
    search = AllocationSearch(model, plan, inputs, windows, stats.dense_inputs, curves, stats.grid, spec, device,
                              source)
    outcome = search.run(start, spec.search_steps, spec.seed)
    targets = {n: outcome.levels[i] for i, group in enumerate(plan.modules) for n in group}
    return replace(allocation, targets=targets, search=outcome.record())
