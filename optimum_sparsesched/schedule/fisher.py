"""The ``hessian`` schedule's end-to-end damage of every block pruned alone, estimated from one backward pass
(``error_metric="fisher"``, the default): linear in depth.

``"kl-alone"`` (:mod:`.statistics`) runs every block's perturbed stream through all later blocks to the logits:
``L²/2`` block forwards per probe window. Here the stream goes through the pruned block only, and the rest of the
way is taken to second order.

Block ``b`` pruned alone (SparseGPT at the target on its dense inputs' Hessians, as ``"kl-alone"`` prunes) changes
its output by ``δh`` ``[T, d]`` on the ``T`` positions of a probe window. To second order the KL of the next-token
distributions is ``½ δhᵀ F δh`` with ``F`` the Fisher information of the output distribution pulled back to the
block's output, ``F = E_{ŷ ~ p_dense}[g gᵀ]``, ``g = ∂(−Σ_t log p(ŷ_t))/∂h``: the gradient of the negative
log-likelihood of labels sampled from the dense model itself (its KL is zero at the dense point, so the first-order
term vanishes and this Fisher — not the empirical one of the text's own labels — is the KL's curvature). Keeping
its diagonal, per probe window:

``D_b,w ≈ ½ Σ_{t,i} g_{t,i}² δh_{t,i}² / T``  (labels sampled once, with a generator seeded by ``seed``),

and ``D_b`` is its mean over the windows (``window_damage[b]`` keeps each window's, for the range's shrinkage in
:func:`.allocate.reliability`). The diagonal is taken where the perturbation is, at the block's output, after the
block's own non-linearities: a module-level version (each module's output error predicted from its OBS saliencies,
weighted by the Fisher diagonal at the module's output) assumed gradient and error independent over positions and
made a schedule no better than uniform on SmolLM2-135M; taking it ``k`` blocks later instead ranked the blocks no
closer to the measured KL (``benchmarks/RESULTS.md``, issue 24). As for ``"kl-alone"``, the curve over ``s`` is the
block's OBS local loss curve scaled to ``D_b`` at the target: ``D_b(s) = D_b · L_b(s) / L_b(target)``.

**Two passes.** Forward, block by block: the dense block on the probe windows (its modules' input Hessians
collected by the same forward: local loss curves and OWL ratios as in :mod:`.statistics`), its modules pruned
alone at the target, the pruned block run once: ``δh`` kept (spilled to files with the dense inputs when the
weights are offloaded). Then the head forward and backward on the last block's dense outputs (labels sampled),
and backward, block by block from the last: the gradient ``g`` at block ``b``'s output gives ``D_b``, and the block
recomputed with autograd on its dense inputs carries ``g`` to its input (block 0's input gradient is not needed).
About 5 block forwards per probe window and block (dense, pruned, recompute, and a backward of about two), one OBS
solve per module, two visits of each block in all, against ``L/2`` forwards for ``"kl-alone"``.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..obs.inverse import all_finite
from ..pipeline.blocks import BlockInputs, find_decoder_blocks, head_and_embeddings_on
from ..pipeline.hessians import collect_block_hessians
from ..pipeline.host_memory import release_free_memory
from ..pipeline.plan import CompressionPlan
from ..pipeline.sources import BlockSource, BlockVisit
from ..pipeline.spill import TensorLists
from .spec import ScheduleSpec
from .statistics import CURVE_POINTS, LayerStatistics, block_statistics, head_logits, pruned_alone

#: positions per chunk of the head's forward and backward: its float32 logits are ``[HEAD_CHUNK, V]``
HEAD_CHUNK = 128


def sample_labels(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row of ``probs`` ``[n, V]`` drawn from it -> ``[n, 1]``; non-finite probabilities (a NaN/Inf in
    the head or the last hidden states) raise ``FloatingPointError`` instead of a silent or cryptic failure."""
    if not all_finite(probs):
        raise FloatingPointError("schedule: the estimated damage of every block is not finite: the model's next-token "
                                 "probabilities on the probe windows are NaN/Inf (try dtype=torch.float32, or "
                                 "schedule='uniform')")
    return torch.multinomial(probs, 1, generator=generator)


def head_gradient(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, hidden: torch.Tensor,
                  returns_tuple: bool, generator: torch.Generator) -> torch.Tensor:
    """``∂(−Σ_t log p(ŷ_t))/∂h`` ``[1, S, d]`` float32 at the last block's output ``hidden`` of one window (``ids``
    ``[1, S]``), the labels ``ŷ_t`` drawn from the dense model's own next-token distributions with ``generator``.
    The model's head (final norm, lm_head, soft-capping ...) runs position chunk by position chunk."""
    grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[1], HEAD_CHUNK):
        part = hidden[:, start:start + HEAD_CHUNK].detach().requires_grad_(True)
        with torch.enable_grad():
            logp = torch.log_softmax(head_logits(model, blocks, ids[:, start:start + HEAD_CHUNK], part,
                                                 returns_tuple).float(), dim=-1)[0]
            labels = sample_labels(logp.detach().exp(), generator)
            (g,) = torch.autograd.grad(-logp.gather(1, labels).sum(), part)
        grad[:, start:start + HEAD_CHUNK] = g.float()
    return grad


def input_gradient(visit: BlockVisit, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The visited block recomputed with autograd on one window's input ``hidden`` ``[1, S, d]``, and ``grad`` (the
    gradient w.r.t. its output) carried back to its input -> float32, where ``hidden`` is stored."""
    x = hidden.to(visit.device).detach().requires_grad_(True)
    with torch.enable_grad():
        out = visit.forward(x)
        (gx,) = torch.autograd.grad(out, x, grad.to(device=visit.device, dtype=out.dtype))
    return gx.float().to(hidden.device)


@torch.no_grad()
def output_gradients(model: nn.Module, source: BlockSource, inputs: BlockInputs, windows: torch.Tensor,
                     dense: Sequence[Sequence[torch.Tensor]], seed: int,
                     device: torch.device) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(b, g_b)`` for every block from the last to the first: ``g_b[w]`` ``[1, S, d]`` float32 is the gradient
    of window ``w``'s sampled-label NLL w.r.t. block ``b``'s output, ``dense[b]`` the probe windows' dense inputs of
    block ``b`` (``dense[L]``: the last block's outputs). Labels are drawn with a generator seeded by ``seed``."""
    _, blocks = find_decoder_blocks(model)
    count = len(source.plan.blocks)
    generator = torch.Generator(device=device).manual_seed(seed)
    with head_and_embeddings_on(model, device):
        grads = [head_gradient(model, blocks, windows[w].unsqueeze(0).to(device), h.to(device), inputs.returns_tuple,
                               generator).to(h.device) for w, h in enumerate(dense[count])]
    for index in tqdm(reversed(range(count)), total=count, desc="schedule: backward", unit="block"):
        yield index, grads
        if index > 0:
            with source.visit(index, device, inputs=inputs) as visit:
                grads = [input_gradient(visit, h, g) for h, g in zip(dense[index], grads)]


def fisher_damage(grads: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> list[float]:
    """``½ Σ_{t,i} g_{t,i}² δh_{t,i}² / T`` of each window (``T`` its positions)."""
    out = []
    for g, d in zip(grads, deltas):
        d = d.to(device=g.device, dtype=torch.float32)
        out.append(0.5 * float((g.square() * d.square()).sum()) / (d.numel() // d.shape[-1]))
    return out


@torch.no_grad()
def measure_fisher_statistics(model: nn.Module, plan: CompressionPlan, inputs: BlockInputs,
                              probe_windows: torch.Tensor, spec: ScheduleSpec, device: torch.device,
                              source: BlockSource | None = None, keep_dense: bool = False) -> LayerStatistics:
    """The statistics of :func:`.statistics.measure_layer_statistics` — local loss curves, OWL ratios and the damage
    ``block_damage[b]`` of every block pruned alone at the target, here estimated (module docstring), with
    ``window_damage[b]`` per probe window — from the probe windows ``[p, seq_len]`` (``inputs.hidden[:p]`` are their
    block-0 inputs). With ``keep_dense`` the dense inputs of every block are kept (for :mod:`.search`)."""
    source = source or BlockSource(plan)
    offloaded = source.offloaded
    try:
        with TensorLists(spill=offloaded and not keep_dense) as dense, TensorLists(spill=offloaded) as deltas:
            return _measure(model, plan, inputs, probe_windows, spec, device, source, dense, deltas, keep_dense)
    finally:
        if offloaded:
            release_free_memory()


def _measure(model: nn.Module, plan: CompressionPlan, inputs: BlockInputs, probe_windows: torch.Tensor,
             spec: ScheduleSpec, device: torch.device, source: BlockSource, dense: TensorLists, deltas: TensorLists,
             keep_dense: bool) -> LayerStatistics:
    count = len(plan.blocks)
    stats = LayerStatistics(grid=torch.linspace(0, 1, CURVE_POINTS, dtype=torch.float64),
                            block_damage=[0.0] * count, window_damage=[[] for _ in range(count)])
    hidden = [h.clone() for h in inputs.hidden[: len(probe_windows)]]
    dense.append(hidden)
    for index in tqdm(range(count), desc="schedule: measure", unit="block"):
        with source.visit(index, device, inputs=inputs) as visit:
            out: list[torch.Tensor] = []
            hessians = block_statistics(visit, collect_block_hessians(visit, hidden, out), spec, stats)
            change = []
            if visit.modules:
                with visit.swapped(pruned_alone(visit, hessians, spec)):
                    for h, ref in zip(hidden, out):  # δh, in the hidden states' dtype and place
                        change.append((visit.forward(h).float() - ref.to(visit.device).float()).to(h))
            del hessians
        deltas.append(change)
        dense.append(out)
        hidden = out
    for index, grads in output_gradients(model, source, inputs, probe_windows, dense, spec.seed, device):
        if plan.modules[index]:
            stats.window_damage[index] = fisher_damage(grads, deltas[index])
            stats.block_damage[index] = sum(stats.window_damage[index]) / len(grads)
    broken = [b for b, d in enumerate(stats.block_damage) if not math.isfinite(d)]
    if broken:  # NaN damage would cluster into one level: a uniform allocation under the name "hessian"
        raise FloatingPointError(f"schedule: the estimated damage of block(s) {broken} on the probe windows is not "
                                 "finite: the model's activations or gradients overflow (try dtype=torch.float32, "
                                 "or schedule='uniform')")
    if keep_dense:
        stats.dense_inputs = [dense[i] for i in range(len(dense))]
    return stats
