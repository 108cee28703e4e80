"""Per-layer statistics that non-uniform schedules allocate from, measured on the dense model.

**OBS saliency curve** (Zhang et al., arXiv 2409.20094). With ``U`` the upper Cholesky factor of ``H⁻¹``
(``H⁻¹ = UᵀU``), removing weight ``w_rq`` while the columns before ``q`` are already fixed and those after it
compensate costs ``ε_rq = w_rq² / U_qq²`` (``U_qq²`` is the ``(q, q)`` entry of the inverse of the Hessian
restricted to the columns ``≥ q``: exactly the OBS cost of the SparseGPT scan). The layer's local loss at sparsity
``s`` is ``L(s) = ½ Σ`` of its ``s``-fraction of smallest ``ε``: a convex, increasing curve read off one sort.

**Why one H⁻¹ per layer is enough ("sequentially pruning all").** SparseGPT prunes column by column; each step
needs the inverse Hessian of the not-yet-fixed columns. Those inverses are the successive Schur complements of
``H⁻¹``, and the rows of one Cholesky factor ``U`` of ``H⁻¹`` hold them all: fixing column ``q`` removes row and
column ``q``, and the next Schur complement's first row is ``U[q+1, q+1:]·U[q+1, q+1]``. Because every row of ``W``
is pruned in the same column order, the single ``U`` serves all rows and all steps; it only has to be computed once,
from the Hessian of the layer's (already upstream-compressed) inputs. The same factor gives every ``ε_rq`` above,
so the estimate costs one sort per layer on top of what pruning computes anyway.

**Why the local loss is not enough, and what we measure instead** (``error_metric="kl-alone"``; the default
``"fisher"`` estimates the same damage in ``O(L)``, :mod:`.fisher`). ``L_l(s)`` is in units of the layer's output
energy, which grows with depth (residual stream scale), and it ignores how much of a layer's error survives to the
model's output: an error made in block 0 passes through every later block. Read literally, the rule prunes the early
blocks hardest. So the damage of block ``b`` is measured end to end: on ``probe_samples`` calibration windows, block
``b`` alone is pruned at the target sparsity with SparseGPT (its Hessian from the dense inputs), the perturbed
stream runs through the dense blocks after it, and the damage is ``D_b = mean_tokens KL(p_dense ‖ p_pruned)`` of the
next-token distributions. All streams advance together block by block (each block visits the device once, and is
read once when the weights are offloaded or streamed; the streams then wait in files, :mod:`..pipeline.spill`, so
host memory stays flat in depth). The pruned block is the block itself with the pruned weights swapped in for its
one perturbed forward (no copy of the block or of accelerate's hooks). The local curve supplies the shape in ``s``:
``D_b(s) ≈ P_b · L_b(s)`` with the propagation factor ``P_b = D_b / L_b(s_target)``; a module's share of its block's
damage is its share of ``L_b``.

**OWL statistics.** Wanda scores ``|W_ij| · ||X_j||`` (``||X_j||² ∝ H_jj``) and the fraction of them above
``M`` × their block mean.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..obs.inverse import InverseHessian
from ..obs.prune import prune
from ..obs.spec import PruneSpec
from ..pipeline.blocks import BlockInputs, find_decoder_blocks, forwards_replaced, head_and_embeddings_on
from ..pipeline.hessians import HessianAccumulator, collect_block_hessians
from ..pipeline.host_memory import release_free_memory
from ..pipeline.plan import CompressionPlan, weight_matrix
from ..pipeline.sources import BlockSource, BlockVisit
from ..pipeline.spill import TensorLists
from .spec import ScheduleSpec

CURVE_POINTS = 201  # sparsity grid 0, 0.005, ..., 1


def saliencies(W: torch.Tensor, H: torch.Tensor | InverseHessian, damp: float = 0.01) -> torch.Tensor:
    """OBS saliencies ``ε = W² / diag(U)²`` ``[rows, cols]`` (float32), ``U`` = upper Cholesky factor of
    ``(H + λI)⁻¹``; dead inputs (``H_ii = 0``) cost nothing."""
    W = W.detach().to(torch.float32)
    inverse = H if isinstance(H, InverseHessian) else InverseHessian(H.to(W.device), damp)
    eps = W**2 / torch.diag(inverse.factor()).unsqueeze(0) ** 2
    eps[:, inverse.dead] = 0.0
    return eps


def local_loss_curve(eps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``L(s) = ½ Σ`` of the ``s``-fraction of smallest saliencies, for each ``s`` in ``grid`` -> float64 ``[len(grid)]``.

    The saliencies are sorted as they are (float32 values: the same order in float64) and summed in float64; on the
    CPU by numpy's sort (SIMD: ~14× faster than ``torch.sort`` for a 576×1536 module here), elsewhere by torch's."""
    flat = eps.detach().flatten()
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    if flat.device.type == "cpu":
        flat = torch.from_numpy(np.sort(flat.numpy())).double()
    else:
        flat = torch.sort(flat).values.double()
    csum = torch.cat([torch.zeros(1, dtype=torch.float64, device=flat.device), torch.cumsum(flat, 0)])
    idx = torch.round(grid.double().to(flat.device) * flat.numel()).long().clamp(0, flat.numel())
    return 0.5 * csum[idx].cpu()


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of Wanda scores above ``m`` × their mean (over all the given score matrices together)."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    mean = total / count
    return sum(int((s > m * mean).sum()) for s in scores) / count


class WandaScores(Sequence):
    """The Wanda scores ``|W| · sqrt(diag H)`` ``[rows, cols]`` of a block's modules, each computed when it is read
    (``items``: ``(module, sqrt(diag H)`` ``[1, cols]``) pairs), so a block's scores never all sit in memory."""

    def __init__(self, items: list[tuple[nn.Module, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        module, root_diag = self.items[i]
        return weight_matrix(module).detach().abs().float() * root_diag


@dataclass
class LayerStatistics:
    """Per-module local loss curves ``curves[name]`` on ``grid``, the OWL outlier ratio of every block, and (when
    measured) the end-to-end damage ``block_damage[b]`` of every block pruned alone at the target."""

    grid: torch.Tensor
    curves: dict[str, torch.Tensor] = field(default_factory=dict)
    owl_ratio_block: list[float] = field(default_factory=list)
    block_damage: list[float] | None = None
    #: when measured window by window (``error_metric="fisher"``): ``block_damage[b]`` on each probe window
    #: (``[L][p]``), the spread the ``"auto"`` range is shrunk by (:func:`.allocate.reliability`)
    window_damage: list[list[float]] | None = None
    #: when kept: the probe windows' dense inputs of every block, and the last block's outputs (``[L + 1][p]``)
    dense_inputs: list[list[torch.Tensor]] | None = None


def head_logits(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, hidden: torch.Tensor,
                returns_tuple: bool) -> torch.Tensor:
    """Run the model's own head (final norm, projections, lm_head, soft-capping ...) on ``hidden``, the output of
    its last decoder block, by replacing every block of ``blocks`` with a pass-through that emits ``hidden``
    (differentiable in ``hidden`` under autograd)."""
    def emit(h, *args, **kwargs):
        return (hidden, None) if returns_tuple else hidden

    with forwards_replaced(blocks, lambda _index: emit):
        return model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def logits_from_last_hidden(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, hidden: torch.Tensor,
                            returns_tuple: bool) -> torch.Tensor:
    """:func:`head_logits` without autograd."""
    return head_logits(model, blocks, input_ids, hidden, returns_tuple)


#: positions per chunk of the KL computation: its float32 temporaries are ``[KL_CHUNK, V]``, not ``[seq_len, V]``
KL_CHUNK = 32


def _kl_per_token(logp_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of ``KL(p_ref ‖ softmax(logits))`` (``[1, S, V]`` each), position chunk by chunk (each
    position's sum over the vocabulary, hence the mean, is the same as in one piece)."""
    per_position = [(ref.exp() * (ref - torch.log_softmax(chunk.float(), dim=-1))).sum(-1)
                    for ref, chunk in zip(logp_ref.split(KL_CHUNK, dim=1), logits.split(KL_CHUNK, dim=1))]
    return float(torch.cat(per_position, dim=1).mean())


def block_statistics(visit: BlockVisit, accumulators: dict[str, HessianAccumulator], spec: ScheduleSpec,
                     stats: LayerStatistics) -> dict[str, InverseHessian]:
    """Add the visited block's local loss curves (``stats.curves``) and OWL ratio (``stats.owl_ratio_block``) from
    its modules' Hessian accumulators (freed here); returns each module's inverse Hessian (shared by a group)."""
    root_diag = {id(a): torch.sqrt(torch.diag(a.H)).unsqueeze(0) for a in accumulators.values()}
    inverses = {id(a): InverseHessian(a.H, spec.damp) for a in dict.fromkeys(accumulators.values())}
    for a in accumulators.values():
        a.H = None  # the inverses hold their own copies
    hessians = {n: inverses[id(a)] for n, a in accumulators.items()}
    for name, m in visit.modules.items():
        stats.curves[name] = local_loss_curve(saliencies(weight_matrix(m), hessians[name]), stats.grid)
    scores = WandaScores([(m, root_diag[id(accumulators[n])]) for n, m in visit.modules.items()])
    stats.owl_ratio_block.append(outlier_ratio(scores, spec.owl_m))
    return hessians


def pruned_alone(visit: BlockVisit, hessians: dict[str, InverseHessian],
                 spec: ScheduleSpec) -> dict[str, torch.Tensor]:
    """The visited block's modules pruned alone at the target by SparseGPT (unstructured, unquantized) on their
    dense inputs' Hessians: weight matrices ``[out, in]`` in the model dtype (the copy the budget counts)."""
    alone = PruneSpec(spec.sparsity, block_size=spec.block_size, damp=spec.damp)
    return {name: prune(visit.weight(name), hessians[name], alone).weight.to(m.weight.dtype)
            for name, m in visit.modules.items()}


@torch.no_grad()
def measure_layer_statistics(model: nn.Module, plan: CompressionPlan, inputs: BlockInputs,
                             probe_windows: torch.Tensor, spec: ScheduleSpec, device: torch.device,
                             source: BlockSource | None = None, keep_dense: bool = False) -> LayerStatistics:
    """Dense pass over the blocks on the probe windows ``[p, seq_len]`` (``inputs.hidden[:p]`` are their block-0
    inputs): local loss curves, OWL ratios and, when ``spec.measures_damage``, the end-to-end damage ``D_b`` of
    pruning block ``b`` alone at the target sparsity: ``D_b = KL(dense ‖ dense…P_b…dense)``. Blocks are visited
    through ``source`` (default: a fresh :class:`.BlockSource` of ``plan``), which reads offloaded weights once per
    block. With ``keep_dense`` the dense inputs of every block are kept (for :mod:`.search`)."""
    source = source or BlockSource(plan)
    offloaded = source.offloaded
    try:
        with TensorLists(spill=spec.measures_damage and offloaded) as streams:
            return _measure(model, plan, inputs, probe_windows, spec, device, source, streams, keep_dense)
    finally:
        if offloaded:
            release_free_memory()


def _measure(model: nn.Module, plan: CompressionPlan, inputs: BlockInputs, probe_windows: torch.Tensor,
             spec: ScheduleSpec, device: torch.device, source: BlockSource, streams: TensorLists,
             keep_dense: bool) -> LayerStatistics:
    grid = torch.linspace(0, 1, CURVE_POINTS, dtype=torch.float64)
    stats = LayerStatistics(grid=grid)
    dense = [h.clone() for h in inputs.hidden[: len(probe_windows)]]
    if keep_dense:
        stats.dense_inputs = [dense]
    # streams[b]: the probe windows with block b pruned, at the current depth
    for index in tqdm(range(len(plan.blocks)), desc="schedule: measure", unit="block"):
        with source.visit(index, device, inputs=inputs) as visit:
            dense_out: list[torch.Tensor] = []
            hessians = block_statistics(visit, collect_block_hessians(visit, dense, dense_out), spec, stats)
            if spec.measures_damage:
                pruned = pruned_alone(visit, hessians, spec)
                for b in range(len(streams)):
                    streams[b] = [visit.forward(h).to(h.device) for h in streams[b]]
                with visit.swapped(pruned):  # the block with its modules pruned alone, for the one new stream
                    streams.append([visit.forward(h).to(h.device) for h in dense])
                del pruned
            dense = dense_out
            if keep_dense:
                stats.dense_inputs.append(dense)
    if spec.measures_damage:
        stats.block_damage = _stream_damage(model, probe_windows, dense, streams, inputs.returns_tuple, device)
    return stats


def _stream_damage(model, windows, dense_final, streams, returns_tuple, device) -> list[float]:
    """Mean per-token KL(dense ‖ perturbed) of every stream's next-token distribution."""
    damage = [0.0] * len(streams)
    _, blocks = find_decoder_blocks(model)
    with head_and_embeddings_on(model, device):
        for w in tqdm(range(len(windows)), desc="schedule: KL damage", unit="window"):
            ids = windows[w].unsqueeze(0).to(device)
            ref = torch.log_softmax(logits_from_last_hidden(model, blocks, ids, dense_final[w].to(device), returns_tuple)
                                    .float(), dim=-1)
            for b in range(len(streams)):
                logits = logits_from_last_hidden(model, blocks, ids, streams[b][w].to(device), returns_tuple)
                damage[b] += _kl_per_token(ref, logits) / len(windows)
    broken = [b for b, d in enumerate(damage) if not math.isfinite(d)]
    if broken:  # NaN damage would cluster into one level: a uniform allocation under the name "hessian"
        raise FloatingPointError(f"schedule: the KL damage of block(s) {broken} on the probe windows is not finite: "
                                 "the model's logits overflow or its head/final norm hold NaN/Inf (try "
                                 "dtype=torch.float32, or schedule='uniform')")
    return damage
