"""The block loop: :func:`compress_blocks` runs SparseGPT block by block over a loaded model.

Data path (:func:`_compress`): the plan (:mod:`.pipeline.plan`: which modules) -> calibration windows
(:mod:`.pipeline.calibration`) -> block-0 inputs and every block's own arguments (:mod:`.pipeline.blocks`) -> the
schedule (:mod:`.schedule`: per-module sparsities, measured on the dense model) -> for each block, in one visit
(:mod:`.pipeline.sources`): Hessians ``H = 2XXᵀ/n`` of its modules from its current inputs
(:mod:`.pipeline.hessians`), the OBS solve of every module (:func:`.obs.prune.prune`), with ``reconstruct_epochs``
the block's kept weights fitted to the dense block's outputs (:mod:`.obs.reconstruct`: the dense model's hidden
states advance beside the compressed ones), and the compressed block produces the next block's inputs. Only the
current block is on the compute device (:mod:`.pipeline.residency`) and only the current block is materialised
when the weights are offloaded or streamed; finished blocks are checkpointed (:mod:`.pipeline.resume`); under
torch.distributed the work is shared (:mod:`.pipeline.distributed`).

Every stage receives the typed spec of what it uses (``config.plan_spec()``, ``schedule_spec()``,
``prune_spec(s)``, ``reconstruct_spec()``, ``residency_spec()``), built here from the config.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SparseScheduleConfig
from .obs.inverse import InverseHessian
from .obs.prune import KERNEL_ENV, check_kernel, prune
from .obs.reconstruct import KeptWeight, reconstruct_block
from .pipeline.blocks import BlockInputs, capture_block_inputs
from .pipeline.calibration import calibration_windows, check_token_ids, resolve_tokenizer
from .pipeline.checkpoint import fingerprint
from .pipeline.distributed import DistributedContext, init_distributed
from .pipeline.hessians import HessianAccumulator, collect_block_hessians
from .pipeline.plan import CompressionPlan, is_transposed, plan_compression
from .pipeline.residency import WorkingSet, compute_device, decide_for_inputs, plan_residency, store
from .pipeline.resume import Resume
from .pipeline.sources import BlockSink, BlockSource, BlockVisit
from .schedule.allocate import Allocation, allocate_sparsities
from .schedule.fisher import measure_fisher_statistics
from .schedule.search import search_allocation
from .schedule.statistics import measure_layer_statistics

logger = logging.getLogger(__name__)


def check_export_format(plan: CompressionPlan, config: SparseScheduleConfig) -> None:
    """Refuse, before any work, a model the chosen ``export_format`` cannot store."""
    if config.export_format == "compressed-tensors":
        from .formats.compressed_tensors import check_exportable

        check_exportable(plan.all_modules)


@torch.no_grad()
def compress_blocks(model: nn.Module, config: SparseScheduleConfig, tokenizer: Any = None,
                    sink: BlockSink | None = None) -> nn.Module:
    """Prune (and optionally quantize) ``model`` in place with SparseGPT under ``config``'s schedule.

    Offloaded blocks are onloaded one at a time and their compressed weights written back to their offload store,
    or, with ``sink``, each finished block's visit is handed to ``sink(visit)`` instead (the streaming path writes
    it into the output checkpoint). Every check against the model and the options runs before any work (a
    ``checkpoint_dir`` is opened, locked and proven writable before calibration). Fills ``config.results``
    (``layer_sparsities``: achieved zero fraction per module; ``layer_errors``: the schedule's estimates, else the
    OBS loss of every module; ``resolved_range``; ``grids`` unless streamed) and sets
    ``model.config.quantization_config = config``.
    """
    kernel = check_kernel(os.environ.get(KERNEL_ENV, "auto"), KERNEL_ENV)
    plan = plan_compression(model, config.plan_spec())
    check_export_format(plan, config)
    working = plan_residency(model, plan, config.residency_spec(), write_back=sink is None)  # refuses a small budget
    tok = resolve_tokenizer(config.tokenizer, tokenizer, model)
    ctx = init_distributed()
    resume = Resume(config.checkpoint_dir, ctx)
    resume.open()  # unwritable, or in use by another run: refused here, before any work
    try:
        return _compress(model, config, plan, working, tok, kernel, ctx, resume, sink)
    finally:
        resume.close()


def _compress(model: nn.Module, config: SparseScheduleConfig, plan: CompressionPlan, working: WorkingSet,
              tok: Any, kernel: str, ctx: DistributedContext, resume: Resume, sink: BlockSink | None) -> nn.Module:
    windows = calibration_windows(config.dataset, tok, config.num_samples, config.seq_len, config.seed)
    check_token_ids(windows, model)
    device, schedule = compute_device(), config.schedule_spec()
    source = BlockSource(plan, sink=sink, grids=config.results.grids)
    saved = resume.load(lambda: fingerprint(config.fingerprint_options(), windows, model), model, source, device,
                        reads_all_blocks=schedule.needs_statistics)
    was_training = model.training
    model.eval()
    inputs = source.inputs = capture_block_inputs(model, windows[ctx.rank::ctx.world], device,
                                                  visit_first=lambda: source.visit(0, device))
    probes = min(schedule.probe_samples, len(windows)) if schedule.needs_statistics and ctx.is_main else 0
    residency = decide_for_inputs(inputs, working, config.residency_spec(), device, probes)
    allocation = Allocation(**saved) if saved else measure_schedule(model, source, windows, config, device,
                                                                   residency.storage, ctx)
    resume.start(allocation.targets, allocation.estimates, allocation.resolved_range)
    aim = config.reconstruct_spec()  # with the dense target, the dense model's stream advances beside
    dense = [h.clone() for h in inputs.hidden] if aim.epochs and aim.target == "dense" else None
    progress = tqdm(total=len(plan.blocks), desc="sparsegpt", unit="block", mininterval=0)
    for index in range(len(plan.blocks)):
        with source.visit(index, device, keep=True) as visit:
            resume.note_weights(visit)
            if dense is not None:  # the dense block's outputs, before its weights are compressed or restored
                dense = [store(visit.forward(h), h) for h in dense]
            outputs: list[torch.Tensor] = []  # the block's outputs when its reconstruction computed them
            if not resume.restore(visit):
                resume.save(visit, *compress_block(visit, inputs, allocation.targets, config, kernel, ctx, dense,
                                                   outputs))
            for j, h in enumerate(inputs.hidden if index + 1 < len(plan.blocks) else []):  # the next block's
                inputs.hidden[j] = store(outputs[j] if outputs else visit.forward(h), h)  # inputs (the last feeds
            del outputs  # none), window by window
        progress.set_postfix(err=f"{sum(resume.losses.values()):.4g}", refresh=False)
        progress.update()
    progress.close()
    if source.loads:
        logger.info("streaming: %s", source.describe())
    config.results.layer_sparsities = resume.achieved
    config.results.layer_errors = allocation.estimates or resume.losses
    config.results.resolved_range, config.results.search = allocation.resolved_range, allocation.search
    model.config.quantization_config = config
    ctx.barrier()
    model.train(was_training)
    return model


def measure_schedule(model: nn.Module, source: BlockSource, windows: torch.Tensor, config: SparseScheduleConfig,
                     device: torch.device, storage: torch.device, ctx: DistributedContext) -> Allocation:
    """The schedule's per-module sparsities, measured by rank 0 on the dense model and sent to every rank."""
    spec, plan, allocation = config.schedule_spec(), source.plan, None
    if ctx.is_main:
        stats = None
        if spec.needs_statistics:
            probe = windows[: spec.probe_samples]
            probe_inputs = source.inputs if ctx.world == 1 else capture_block_inputs(
                model, probe, device, storage, visit_first=lambda: source.visit(0, device))
            measure = measure_fisher_statistics if spec.estimates_damage else measure_layer_statistics
            stats = measure(model, plan, probe_inputs, probe, spec, device, source, keep_dense=spec.search_steps > 0)
        allocation = allocate_sparsities(plan, spec, stats)
        if spec.search_steps > 0 and stats is not None:
            allocation = search_allocation(model, plan, probe_inputs, probe, stats, allocation, spec, device, source)
            logger.info("allocation search: KL %.5g -> %.5g in %d steps", allocation.search["kl_before"],
                        allocation.search["kl_after"], allocation.search["steps"])
    return ctx.broadcast_object(allocation)


def compress_block(visit: BlockVisit, inputs: BlockInputs, targets: dict[str, float], config: SparseScheduleConfig,
                   kernel: str, ctx: DistributedContext, dense: list[torch.Tensor] | None = None,
                   outputs: list[torch.Tensor] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """One block, in its visit: Hessians of its modules on ``inputs.hidden``, the OBS solve of every module at its
    target, and with ``reconstruct_epochs`` block reconstruction toward ``dense`` (the dense block's outputs on the
    dense model's stream; without it, no reconstruction) or, with ``reconstruct_target="local"``, toward the dense
    block's outputs on ``inputs.hidden`` (recorded by the Hessian forward). When the reconstruction's weights are
    kept, ``outputs`` receives the block's outputs on every window (the next block's inputs, on the inputs'
    device). Returns the achieved sparsity and the OBS loss of every module."""
    spec = config.reconstruct_spec()
    local = [] if spec.epochs and spec.target == "local" else None  # filled by the Hessian forward
    losses = solve_block(visit, collect_block_hessians(visit, inputs.hidden, local), targets, config, kernel, ctx)
    aim = local if local is not None else dense if spec.epochs else None
    if aim is not None:
        after: list[torch.Tensor] = []
        fit = reconstruct_block([KeptWeight(m.weight, is_transposed(m), visit.grids.get(n))
                                 for n, m in visit.modules.items()], lambda j: visit.forward(inputs.hidden[j]),
                                aim, spec, visit.index, ctx, list(visit.block.parameters()),
                                emit=lambda j, out: after.append(out.to(inputs.hidden[j].device)))
        if fit.kept and outputs is not None:
            outputs[:] = after
        logger.info("block %d reconstruction: output error %.4g -> %.4g%s", visit.index, fit.before, fit.after,
                    "" if fit.kept else " (not lower: the solver's weights kept)")
    achieved = {n: float((m.weight == 0).sum().item() / m.weight.numel()) for n, m in visit.modules.items()}
    return achieved, losses


def solve_block(visit: BlockVisit, accumulators: dict[str, HessianAccumulator], targets: dict[str, float],
                config: SparseScheduleConfig, kernel: str, ctx: DistributedContext) -> dict[str, float]:
    """SparseGPT on every module of the visited block from its Hessians (one per distinct input, all-reduced over
    ranks), in place: the modules are solved round-robin over the ranks and shared (:mod:`.pipeline.distributed`).
    Returns the OBS loss of every module."""
    inverses: dict[int, InverseHessian] = {}
    for acc in dict.fromkeys(accumulators.values()):  # each shared Hessian once, in module order
        inverses[id(acc)] = InverseHessian(acc.reduced(ctx), config.damp)  # the single process's H bit for bit
    losses = {}
    for name in ctx.owned(list(visit.modules)):
        try:
            result = prune(visit.weight(name).to(visit.device), inverses[id(accumulators[name])],
                           config.prune_spec(targets[name]), kernel)
        except FloatingPointError as exc:  # name the module the solve failed on
            raise FloatingPointError(f"{name}: {exc}") from None
        visit.write({name: result.weight})
        if result.grid is not None:
            visit.grids[name] = tuple(t.detach().cpu() for t in result.grid)
        losses[name] = result.loss
        if result.sparsegpt_loss is not None:
            logger.debug("%s: layer loss %.6g with solver %s, SparseGPT scan %.6g", name, result.loss, result.solver,
                         result.sparsegpt_loss)
    del inverses
    ctx.share_solved(visit.modules, visit.grids, config.group_size if config.bits is not None else None)
    return ctx.merge_dicts(losses)
