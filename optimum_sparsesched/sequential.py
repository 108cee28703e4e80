"""The sequential pass: :func:`compress_blocks` runs SparseGPT block by block over a loaded model.

Data path: the plan (:mod:`.pipeline.plan`: which modules) -> calibration windows (:mod:`.pipeline.calibration`) ->
block-0 inputs and every block's own arguments (:mod:`.pipeline.blocks`) -> the schedule (:mod:`.schedule`:
per-module sparsities, measured on the dense model) -> for each block: Hessians ``H = 2XXᵀ/n`` of its modules from
its current inputs (:mod:`.pipeline.hessians`), the OBS solve of every module (:func:`.obs.prune.prune`), with
``reconstruct_epochs`` the block's kept weights fitted to the dense block's outputs (:mod:`.pipeline.reconstruct`:
the dense model's hidden states advance beside the compressed ones), and the compressed block produces the next
block's inputs. Only the current block is on the compute device (:mod:`.pipeline.residency`), and only the current
block is materialised when the weights are offloaded or streamed (every pass visits blocks through a
:class:`.pipeline.sources.BlockSource`); finished blocks are checkpointed (:mod:`.pipeline.checkpoint`); under
torch.distributed the work is shared (:mod:`.pipeline.distributed`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SparseScheduleConfig
from .obs.grid import set_module_grid
from .obs.inverse import InverseHessian
from .obs.prune import KERNEL_ENV, check_kernel, prune
from .obs.spec import PruneSpec
from .pipeline.blocks import BlockInputs, capture_block_inputs, run_block
from .pipeline.calibration import calibration_windows, check_token_ids, resolve_tokenizer
from .pipeline.checkpoint import BlockCheckpoint, block_state, fingerprint, restore_block
from .pipeline.digest import block_digest, outside_digest
from .pipeline.distributed import DistributedContext, init_distributed
from .pipeline.hessians import collect_block_hessians, input_groups
from .pipeline.plan import CompressionPlan, plan_compression, set_weight_matrix, weight_matrix
from .pipeline.reconstruct import reconstruct_block
from .pipeline.residency import compute_device, decide_for_inputs, plan_residency, store
from .pipeline.sources import BlockSink, BlockSource
from .schedule.allocate import Allocation, allocate_sparsities, measures_damage, needs_statistics
from .schedule.search import search_allocation
from .schedule.statistics import measure_layer_statistics

logger = logging.getLogger(__name__)


def check_export_format(plan: CompressionPlan, config: SparseScheduleConfig) -> None:
    """Refuse, before any work, a model the chosen ``export_format`` cannot store."""
    if config.export_format == "compressed-tensors":
        from .formats.compressed_tensors import check_exportable

        check_exportable(plan.all_modules)


def compress_block(modules: dict[str, nn.Module], accumulators: dict[str, Any], targets: dict[str, float],
                   config: SparseScheduleConfig, device: torch.device, kernel: str,
                   ctx: DistributedContext, first: int = 0) -> dict[str, float]:
    """SparseGPT on every module of ``modules`` (a block, or a part of it) from its Hessians (one per distinct input,
    all-reduced over ranks), in place: the ``k``-th module is solved on rank ``(first + k) mod world`` and
    broadcast. Returns the OBS loss of every module."""
    inverses: dict[int, InverseHessian] = {}
    for acc in dict.fromkeys(accumulators.values()):  # each shared Hessian once, in module order
        H = acc.reduced(ctx)  # the single process's H bit for bit; frees the accumulator's sums
        inverses[id(acc)] = InverseHessian(H, config.damp)
        H = None  # the inverse holds its own copy
    losses = {}
    for k, (name, m) in enumerate(modules.items(), start=first):
        if ctx.owner(k) == ctx.rank:
            try:
                result = prune(weight_matrix(m).to(device), inverses[id(accumulators[name])],
                               PruneSpec.from_config(config, targets[name]), kernel)
            except FloatingPointError as exc:  # name the module the solve failed on
                raise FloatingPointError(f"{name}: {exc}") from None
            set_weight_matrix(m, result.weight)
            set_module_grid(m, result.grid)
            losses[name] = result.loss
            if result.sparsegpt_loss is not None:
                logger.debug("%s: layer loss %.6g with solver %s, SparseGPT scan %.6g", name, result.loss,
                             result.solver, result.sparsegpt_loss)
    del inverses
    for k, (name, m) in enumerate(modules.items(), start=first):
        rows, cols = weight_matrix(m).shape
        groups = 0 if config.bits is None else 1 if config.group_size == -1 else -(-cols // config.group_size)
        ctx.broadcast_module(m, (rows, cols), groups, src=ctx.owner(k))
    return ctx.merge_dicts(losses)


def measure_schedule(model: nn.Module, plan: CompressionPlan, inputs: BlockInputs, windows: torch.Tensor,
                     config: SparseScheduleConfig, device: torch.device, storage: torch.device,
                     ctx: DistributedContext, source: BlockSource) -> Allocation:
    """The schedule's per-module sparsities, measured by rank 0 on the dense model and sent to every rank."""
    allocation = None
    if ctx.is_main:
        stats = None
        if needs_statistics(config):
            probe = windows[: config.probe_samples]
            probe_inputs = inputs if ctx.world == 1 else capture_block_inputs(
                model, probe, device, storage, visit=functools.partial(source.visit, 0))
            stats = measure_layer_statistics(model, plan, probe_inputs, probe, config, device,
                                             measures_damage(config), source, keep_dense=config.search_steps > 0)
        allocation = allocate_sparsities(plan, config, stats)
        if config.search_steps > 0:
            allocation = search_allocation(model, plan, probe_inputs, probe, stats, allocation, config, device,
                                           source)
            logger.info("allocation search: KL %.5g -> %.5g in %d steps", allocation.search["kl_before"],
                        allocation.search["kl_after"], allocation.search["steps"])
    return ctx.broadcast_object(allocation)


@torch.no_grad()
def compress_blocks(model: nn.Module, config: SparseScheduleConfig, tokenizer: Any = None,
                    sink: BlockSink | None = None) -> nn.Module:
    """Prune (and optionally quantize) ``model`` in place with SparseGPT under ``config``'s schedule.

    Offloaded blocks are onloaded one at a time and their compressed weights written back to their offload store,
    or, with ``sink``, handed to ``sink(index, block, modules)`` instead (the streaming path writes them into the
    output checkpoint). Every check against the model and the options runs before any work (a ``checkpoint_dir`` is
    opened, locked and proven writable before calibration). Fills ``config.results`` (``layer_sparsities``: achieved
    zero fraction per module; ``layer_errors``: the schedule's estimates, else the OBS loss of every module;
    ``resolved_range``) and sets ``model.config.quantization_config = config``.
    """
    kernel = check_kernel(os.environ.get(KERNEL_ENV, "auto"), KERNEL_ENV)
    plan = plan_compression(model, config)
    check_export_format(plan, config)
    damage = int(measures_damage(config))
    working = plan_residency(model, plan, config, damage, write_back=sink is None)  # refuses a too small budget
    tok = resolve_tokenizer(config, tokenizer, model)
    ctx = init_distributed()
    checkpoint = BlockCheckpoint(config.checkpoint_dir) if config.checkpoint_dir else None
    if checkpoint is not None and ctx.is_main:
        checkpoint.open()  # unwritable, or in use by another run: refused here, before any work
    try:
        return _compress(model, config, plan, working, damage, tok, kernel, ctx, checkpoint, sink)
    finally:
        if checkpoint is not None:
            checkpoint.close()


def _compress(model: nn.Module, config: SparseScheduleConfig, plan: CompressionPlan, working: Any, damage: int,
              tok: Any, kernel: str, ctx: DistributedContext, checkpoint: BlockCheckpoint | None,
              sink: BlockSink | None) -> nn.Module:
    windows = calibration_windows(config.dataset, tok, config.num_samples, config.seq_len, config.seed)
    check_token_ids(windows, model)
    device = compute_device()
    manifest = None
    digests: dict[int, str] = {}
    source = BlockSource(sink)

    def visited_digest(i: int) -> str:  # an offloaded block is read once for it
        with source.visit(i, plan.blocks[i], device):
            return block_digest(plan.blocks[i])

    if checkpoint is not None:
        checkpoint.fingerprint = fingerprint(config, windows, model)
        manifest = checkpoint.load()
        outside = outside_digest(model, plan.blocks)
        if manifest is not None:  # the weights must be those the saved blocks were made from; nothing touched yet
            checkpoint.check_weights(manifest, outside, visited_digest)
            digests = {int(k): v for k, v in manifest["weights"]["blocks"].items()}
        elif needs_statistics(config):  # the schedule reads every block: a resume must find all of them unchanged
            digests = {i: visited_digest(i) for i in range(len(plan.blocks))}
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, windows[ctx.rank::ctx.world], device,
                                  visit=functools.partial(source.visit, 0))
    probe_count = min(config.probe_samples, len(windows)) if needs_statistics(config) and ctx.is_main else 0
    residency = decide_for_inputs(inputs, working, config, device, probe_count, damage)
    if manifest is not None:  # resume: the schedule was measured by the interrupted run
        allocation = Allocation(manifest["targets"], manifest["estimates"], manifest["resolved_range"])
        logger.info("resuming from %s after block %d", config.checkpoint_dir, manifest["finished_blocks"] - 1)
    else:
        allocation = measure_schedule(model, plan, inputs, windows, config, device, residency.storage, ctx, source)
        if checkpoint is not None and ctx.is_main:
            manifest = checkpoint.start(allocation.targets, allocation.estimates, allocation.resolved_range,
                                        outside, digests)
    finished = manifest["finished_blocks"] if manifest is not None else 0
    achieved: dict[str, float] = dict(manifest["achieved"]) if manifest is not None else {}
    losses: dict[str, float] = dict(manifest["errors"]) if manifest is not None else {}

    # one refresh per finished block: the count, elapsed<remaining (ETA) and the running sum of OBS loss estimates
    progress = tqdm(total=len(plan.blocks), desc="sparsegpt", unit="block", mininterval=0)
    # block reconstruction aims at the dense model's block outputs: the dense stream advances beside the compressed one
    dense = [h.clone() for h in inputs.hidden] if config.reconstruct_epochs else None
    for index, block in enumerate(plan.blocks):
        modules = plan.modules[index]
        saved = checkpoint.load_block(manifest, index) if index < finished else None
        if index < finished and not all(ctx.merge_dicts({ctx.rank: saved is not None}).values()):
            finished = index  # a damaged block file: recompute it and every block after it
        with source.visit(index, block, device, updated=modules) as on:
            if checkpoint is not None and index >= finished and index not in digests:
                digests[index] = block_digest(block)  # its weights before compression (materialised now)
            if dense is not None:  # the dense block's outputs, before its weights are compressed or restored
                dense = [store(run_block(block, h, inputs.args[index], inputs.kwargs[index], on, inputs.returns_tuple),
                               h) for h in dense]
            if index < finished:
                restore_block(modules, saved)
            else:
                # true_sequential: one group of modules reading the same input at a time, in forward order, each
                # from the inputs the already compressed groups before it produce; else the whole block at once
                groups = input_groups(block, modules, inputs, index, on, inputs.hidden[0])
                for names in groups if config.true_sequential else [list(modules)]:
                    part = {name: modules[name] for name in names}
                    accumulators = collect_block_hessians(block, part, inputs, index, on, groups=[
                        g for g in groups if g[0] in part], stop_early=config.true_sequential)
                    losses.update(compress_block(part, accumulators, allocation.targets, config, on, kernel, ctx,
                                                 first=list(modules).index(names[0])))
                    del accumulators
                if dense is not None:
                    fit = reconstruct_block(block, modules, inputs, index, dense, on, config.reconstruct_epochs,
                                            config.reconstruct_lr, ctx, config.seed, config.bits, config.group_size)
                    logger.info("block %d reconstruction: output error %.4g -> %.4g%s", index, fit.before, fit.after,
                                "" if fit.kept else " (not lower: the solver's weights kept)")
                achieved.update({n: float((m.weight == 0).sum().item() / m.weight.numel())
                                 for n, m in modules.items()})
            for j, h in enumerate(inputs.hidden):
                out = run_block(block, h, inputs.args[index], inputs.kwargs[index], on, inputs.returns_tuple)
                inputs.hidden[j] = store(out, h)
            if checkpoint is not None and index >= finished and ctx.is_main:  # while the weights are materialised
                checkpoint.save_block(manifest, index, block_state(modules), {n: achieved[n] for n in modules},
                                      {n: losses[n] for n in modules}, digests[index])
        progress.set_postfix(err=f"{sum(losses.values()):.4g}", refresh=False)
        progress.update()
    progress.close()
    if source.loads:
        logger.info("streaming: %s", source.describe())

    results = config.results
    results.layer_sparsities = achieved
    results.layer_errors = allocation.estimates or losses
    results.resolved_range = allocation.resolved_range
    results.search = allocation.search
    model.config.quantization_config = config
    ctx.barrier()
    if was_training:
        model.train()
    return model
