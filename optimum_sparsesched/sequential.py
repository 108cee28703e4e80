"""The sequential pass: `compress(model, config)` runs SparseGPT block by block over a loaded model.

Data path: calibration windows -> block-0 inputs and per-block arguments (:mod:`.capture`) -> for each block:
Hessians ``H = 2XXᵀ/n`` of every Linear/Conv1D from the current (already compressed upstream) inputs -> per-module
sparsity from the schedule (:mod:`.schedule`) -> OBS pruning/quantization (:mod:`.obs`) -> the compressed block
produces the next block's inputs. Only the current block is on the compute device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibration_windows
from .capture import (
    block_device,
    capture_block_inputs,
    compressible_modules,
    find_decoder_blocks,
    run_block,
    set_weight_matrix,
    weight_matrix,
    module_device,
)
from .checkpoint import BlockCheckpoint, fingerprint
from .compact import GRID_ATTR
from .config import SparseScheduleConfig
from .distributed import DistributedContext, init_distributed
from .hessian import collect_block_hessians
from .obs import InverseHessian, SparseGPT
from .residency import decide_for_inputs, plan_residency, store
from .serialization import install_atomic_save
from .schedule import level_schedule, optimal_allocation, owl_schedule, ramp_schedule, uniform_schedule
from .sensitivity import LayerStatistics, measure_layer_statistics

AUTO_SEARCH_HALF_WIDTH = 0.3  # "auto" ranges are searched inside target ± this, within [0, 0.99]
RAMP_DEFAULT_HALF_WIDTH = 0.1

logger = logging.getLogger(__name__)


@dataclass
class CompressionPlan:
    """Which modules get compressed. ``modules[i]`` maps qualified names to the modules of block ``i``."""

    blocks: nn.ModuleList
    modules: list[dict[str, nn.Module]]

    @property
    def sizes(self) -> dict[str, int]:
        return {name: m.weight.numel() for group in self.modules for name, m in group.items()}


def _is_skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or ("." + s + ".") in name
               for s in skip)


def plan_compression(model: nn.Module, config: SparseScheduleConfig) -> CompressionPlan:
    """Find the blocks and their compressible modules; check the config against the model (before any work)."""
    blocks_name, blocks = find_decoder_blocks(model)
    all_names = [n for n, _ in model.named_modules()]
    default_skips = {"lm_head"}
    for entry in config.modules_to_not_convert:
        if entry not in default_skips and not any(_is_skipped(n, [entry]) for n in all_names):
            raise ValueError(f"modules_to_not_convert: {entry!r} matches no module of {type(model).__name__}; "
                             f"module names look like {all_names[min(5, len(all_names) - 1)]!r}")
    modules = []
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}." if blocks_name else f"{i}."
        group = {prefix + n: m for n, m in compressible_modules(block).items()
                 if not _is_skipped(prefix + n, config.modules_to_not_convert)}
        modules.append(group)
    if config.export_format == "compressed-tensors":
        from .compressed_tensors_export import check_exportable

        check_exportable({name: m for group in modules for name, m in group.items()})
    if not any(modules):
        raise ValueError(f"model: {type(model).__name__} has no compressible nn.Linear/Conv1D inside its decoder "
                         f"blocks (after modules_to_not_convert={config.modules_to_not_convert})")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise ValueError(f"seq_len: {config.seq_len} is longer than the model's {max_positions} positions; "
                         f"allowed: 1..{max_positions}")
    nm = config.nm
    if nm is not None:
        for group in modules:
            for name, m in group.items():
                cols = weight_matrix(m).shape[1]
                if cols % nm[1]:
                    raise ValueError(f"pattern: {config.pattern!r} needs the input size of every module to be a "
                                     f"multiple of M={nm[1]}; {name} has {cols} inputs")
    return CompressionPlan(blocks=blocks, modules=modules)


def allocate_sparsities(plan: CompressionPlan, config: SparseScheduleConfig,
                        stats: LayerStatistics | None) -> tuple[dict[str, float], dict[str, float]]:
    """Per-module target sparsities from the schedule, and the per-module error estimates it used.

    Layers are blocks (``granularity="block"``, all modules of a block share one sparsity) or modules, in depth
    order; every allocation is parameter-weighted and lands exactly on ``config.sparsity``."""
    sizes = plan.sizes
    s = config.sparsity
    if config.schedule == "uniform" or s == 0:
        return uniform_schedule(sizes, s), {}
    if config.granularity == "block":
        layers = {f"block.{i}": list(group) for i, group in enumerate(plan.modules) if group}
    else:
        layers = {name: [name] for group in plan.modules for name in group}
    layer_sizes = {layer: sum(sizes[n] for n in names) for layer, names in layers.items()}
    manual = tuple(config.sparsity_range) if config.sparsity_range != "auto" else None
    estimates: dict[str, float] = {}

    if config.schedule == "ramp":
        lo, hi = manual or (max(0.0, s - RAMP_DEFAULT_HALF_WIDTH), min(0.99, s + RAMP_DEFAULT_HALF_WIDTH))
        per_layer = ramp_schedule(layer_sizes, s, lo, hi)
    elif config.schedule == "owl":
        assert stats is not None
        if config.granularity == "block":
            ratios = {f"block.{i}": stats.owl_ratio_block[i] for i, g in enumerate(plan.modules) if g}
        else:
            ratios = {n: stats.owl_ratio_module[n] for n in layers}
        estimates = {n: ratios[layer] for layer, names in layers.items() for n in names}
        if manual:
            per_layer = owl_schedule(ratios, layer_sizes, s, (manual[1] - manual[0]) / 2)
        else:
            per_layer = owl_schedule(ratios, layer_sizes, s, config.owl_lambda)
    else:  # hessian
        assert stats is not None
        t = int(round(s * (len(stats.grid) - 1)))
        local = {layer: sum(stats.curves[n] for n in names) for layer, names in layers.items()}
        if config.error_metric == "obs":
            curves = local
        else:
            block_of = {n: i for i, group in enumerate(plan.modules) for n in group}
            block_local = {i: sum(stats.curves[n] for n in group) for i, group in enumerate(plan.modules) if group}
            damage = stats.block_damage[config.error_metric]
            factor = {i: damage[i] / max(float(block_local[i][t]), 1e-30) for i in block_local}
            curves = {layer: factor[block_of[names[0]]] * local[layer] for layer, names in layers.items()}
        errors = {layer: max(float(c[t]), 1e-30) for layer, c in curves.items()}
        for layer, names in layers.items():
            layer_local = float(local[layer][t]) or 1.0
            for n in names:
                estimates[n] = errors[layer] * float(stats.curves[n][t]) / layer_local
        if manual:
            lo, hi = manual
        else:
            box = (max(0.0, s - AUTO_SEARCH_HALF_WIDTH), min(0.99, s + AUTO_SEARCH_HALF_WIDTH))
            grid = stats.grid.tolist()
            best = optimal_allocation({k: (grid, c.tolist()) for k, c in curves.items()}, layer_sizes, s, *box)
            lo, hi = min(best.values()), max(best.values())
            lo, hi = min(lo, s), max(hi, s)
        config.resolved_range = [lo, hi]
        per_layer = level_schedule(errors, layer_sizes, s, lo, hi, config.num_levels)
    return {n: per_layer[layer] for layer, names in layers.items() for n in names}, estimates


def resolve_tokenizer(config: SparseScheduleConfig, tokenizer: Any, model: nn.Module) -> Any:
    """The tokenizer object: the argument, else ``config.tokenizer`` (object or name), else the model's path."""
    tok = tokenizer if tokenizer is not None else config.tokenizer
    if tok is None:
        tok = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not tok:
            raise ValueError("tokenizer: the model has no name_or_path; pass tokenizer= (an object or a name/path)")
    if isinstance(tok, str):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer: could not load a tokenizer from {tok!r}: {exc}") from exc
    return tok


def _compress_block(block: nn.Module, modules: dict[str, nn.Module], inputs: Any, index: int,
                    targets: dict[str, float], config: SparseScheduleConfig, device: torch.device,
                    achieved: dict[str, float], errors: dict[str, float], ctx: DistributedContext) -> None:
    """Hessians of one block's modules from its current inputs (one per distinct input, all-reduced over ranks),
    then SparseGPT on each module (round-robin over ranks, results broadcast), in place."""
    accumulators = collect_block_hessians(block, modules, inputs, index, device)
    inverses: dict[int, InverseHessian] = {}
    for acc in dict.fromkeys(accumulators.values()):  # each shared Hessian once, in module order
        H, _ = ctx.all_reduce_hessian(acc.H, acc.n)
        inverses[id(acc)] = InverseHessian(H, config.damp)
    local_errors = {}
    for k, (name, m) in enumerate(modules.items()):
        if ctx.owner(k) == ctx.rank:
            sparsegpt = SparseGPT(weight_matrix(m).to(device), inverses[id(accumulators[name])])
            Q, local_errors[name] = sparsegpt.prune(
                targets[name], nm=config.nm, bits=config.bits, group_size=config.group_size, sym=config.sym,
                block_size=config.block_size)
            set_weight_matrix(m, Q)
            if sparsegpt.scale is not None:
                setattr(m, GRID_ATTR, (sparsegpt.scale.cpu(), sparsegpt.zero.cpu()))
    del inverses, accumulators
    for k, (name, m) in enumerate(modules.items()):
        ctx.broadcast_(m.weight, src=ctx.owner(k))
        if config.bits is not None and ctx.enabled:
            rows, cols = weight_matrix(m).shape
            groups = 1 if config.group_size == -1 else -(-cols // config.group_size)
            grid = getattr(m, GRID_ATTR, None) or tuple(torch.empty(rows, groups) for _ in range(2))
            grid = tuple(t.to(m.weight.device) for t in grid)  # NCCL broadcasts device tensors only
            for t in grid:
                ctx.broadcast_(t, src=ctx.owner(k))
            setattr(m, GRID_ATTR, tuple(t.cpu() for t in grid))
        achieved[name] = float((m.weight == 0).sum().item() / m.weight.numel())
    errors.update(ctx.merge_dicts(local_errors))


def compute_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def compress(model: nn.Module, config: SparseScheduleConfig | dict, tokenizer: Any = None) -> nn.Module:
    """Prune (and optionally quantize) ``model`` in place with SparseGPT under ``config``'s schedule.

    Records ``config.layer_sparsities`` (achieved zero fraction per module) and ``config.layer_errors`` (OBS loss
    estimate per module), and sets ``model.config.quantization_config = config`` so ``save_pretrained`` keeps it.
    """
    if isinstance(config, dict):
        config = SparseScheduleConfig(**config)
    plan = plan_compression(model, config)
    measures = config.schedule in ("hessian", "owl") and config.sparsity > 0  # the schedule's statistics pass
    damage = int(measures and config.schedule == "hessian" and config.error_metric != "obs")  # its KL streams
    working = plan_residency(model, plan, config, damage)  # refuses a budget too small for one block
    tok = resolve_tokenizer(config, tokenizer, model)
    windows = calibration_windows(config.dataset, tok, config.num_samples, config.seq_len, config.seed)

    ctx = init_distributed()
    device = compute_device()
    checkpoint = manifest = None
    if config.checkpoint_dir:
        checkpoint = BlockCheckpoint(config.checkpoint_dir, fingerprint(config, windows, model))
        manifest = checkpoint.load()
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, windows[ctx.rank::ctx.world], device)
    probe_count = min(config.probe_samples, len(windows)) if measures and ctx.is_main else 0
    residency = decide_for_inputs(inputs, working, config, device, probe_count, damage)
    if manifest is not None:  # resume: the schedule was measured by the interrupted run
        targets, estimates = manifest["targets"], manifest["estimates"]
        config.resolved_range = manifest["resolved_range"]
        logger.info("resuming from %s after block %d", config.checkpoint_dir, manifest["finished_blocks"] - 1)
    else:
        plan_result = None
        if ctx.is_main:
            stats = None
            if measures:
                probe = windows[: config.probe_samples]
                probe_inputs = inputs if ctx.world == 1 else capture_block_inputs(model, probe, device,
                                                                                  residency.storage)
                modes = [config.error_metric] if damage else []
                stats = measure_layer_statistics(model, plan, probe_inputs, probe, config, device, modes)
            plan_result = (*allocate_sparsities(plan, config, stats), config.resolved_range)
        targets, estimates, config.resolved_range = ctx.broadcast_object(plan_result)
        if checkpoint is not None and ctx.is_main:
            manifest = checkpoint.start(targets, estimates, config.resolved_range)
    finished = manifest["finished_blocks"] if manifest is not None else 0
    achieved: dict[str, float] = dict(manifest["achieved"]) if manifest is not None else {}
    errors: dict[str, float] = dict(manifest["errors"]) if manifest is not None else {}

    # one refresh per finished block: the count, elapsed<remaining (ETA) and the running sum of OBS loss estimates
    progress = tqdm(total=len(plan.blocks), desc="sparsegpt", unit="block", mininterval=0)
    for index, block in enumerate(plan.blocks):
        home = module_device(block)
        on = block_device(block, device)  # a block a device_map put on a GPU stays there
        block.to(on)
        modules = plan.modules[index]
        if index < finished:
            saved = checkpoint.load_block(index)
            for name, m in modules.items():
                m.weight.data.copy_(saved[name])
                if f"{name}.grid_scale" in saved:
                    setattr(m, GRID_ATTR, (saved[f"{name}.grid_scale"], saved[f"{name}.grid_zero"]))
        else:
            _compress_block(block, modules, inputs, index, targets, config, on, achieved, errors, ctx)
        for j, h in enumerate(inputs.hidden):
            out = run_block(block, h, inputs.args[index], inputs.kwargs[index], on, inputs.returns_tuple)
            inputs.hidden[j] = store(out, h)
        block.to(home)
        if checkpoint is not None and index >= finished and ctx.is_main:
            saved = {n: m.weight for n, m in modules.items()}
            for n, m in modules.items():
                if getattr(m, GRID_ATTR, None) is not None:
                    saved[f"{n}.grid_scale"], saved[f"{n}.grid_zero"] = getattr(m, GRID_ATTR)
            checkpoint.save_block(manifest, index, saved,
                                  {n: achieved[n] for n in modules}, {n: errors[n] for n in modules})
        progress.set_postfix(err=f"{sum(errors.values()):.4g}", refresh=False)
        progress.update()
    progress.close()

    config.layer_sparsities = achieved
    config.layer_errors = estimates or errors
    model.config.quantization_config = config
    if getattr(model, "hf_quantizer", None) is None:  # compress() called directly: save like from_pretrained's
        from .quantizer import SparseScheduleQuantizer

        model.hf_quantizer = SparseScheduleQuantizer(config, pre_quantized=True)
    install_atomic_save(model)
    ctx.barrier()
    if was_training:
        model.train()
    return model
