"""Which weights a run compresses: every ``nn.Linear`` / transformers ``Conv1D`` inside the decoder blocks, minus
``modules_to_not_convert``; checked against the model before any work.

A compressible module's weight is always handled as a matrix ``W`` ``[out_features, in_features]``
(:func:`weight_matrix`): GPT-2's ``Conv1D`` stores it transposed, and :func:`set_weight_matrix` writes results back in
the module's own layout and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .blocks import find_decoder_blocks


def compressible_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2) inside a block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as ``[in_features, out_features]`` (transformers' Conv1D)."""
    return isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    return module.weight.t() if is_transposed(module) else module.weight


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w`` ``[out_features, in_features]`` back in the module's own layout and dtype."""
    w = w.t() if is_transposed(module) else w
    module.weight.data.copy_(w.to(module.weight.dtype))


def module_sizes(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """Number of weights of each named module, in the model's module order (of the dense layer that a module kept
    compact in memory stands for: its ``dense_numel``)."""
    wanted = set(names)
    return {n: int(getattr(m, "dense_numel", None) or m.weight.numel()) for n, m in model.named_modules()
            if n in wanted and hasattr(m, "weight")}


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether the qualified module ``name`` is matched by an entry of ``modules_to_not_convert`` (the full name,
    a dotted suffix, a dotted prefix or a dotted component)."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or ("." + s + ".") in name
               for s in skip)


@dataclass(frozen=True)
class PlanSpec:
    """What the plan is checked against: ``skip`` (``modules_to_not_convert``: names, dotted suffixes or prefixes),
    the calibration ``seq_len`` and the ``nm`` pattern ``(N, M)`` (``None``: unstructured)."""

    skip: tuple[str, ...] = ("lm_head",)
    seq_len: int = 2048
    nm: tuple[int, int] | None = None


@dataclass
class CompressionPlan:
    """The decoder blocks (the ``nn.ModuleList`` named ``blocks_name``) and, per block, the modules compressed in
    it: ``modules[i]`` maps qualified names to the modules of ``blocks[i]``."""

    blocks: nn.ModuleList
    modules: list[dict[str, nn.Module]]
    blocks_name: str = ""

    def prefix(self, index: int) -> str:
        """The qualified name of block ``index`` and a dot (``"model.layers.7."``), which its tensors start with."""
        return f"{self.blocks_name}.{index}." if self.blocks_name else f"{index}."

    @property
    def sizes(self) -> dict[str, int]:
        """Number of weights of every compressed module, in depth order."""
        return {name: m.weight.numel() for group in self.modules for name, m in group.items()}

    @property
    def all_modules(self) -> dict[str, nn.Module]:
        return {name: m for group in self.modules for name, m in group.items()}

    @classmethod
    def of_compressed(cls, model: nn.Module, names: Iterable[str]) -> "CompressionPlan":
        """The plan of an already compressed model whose compressed modules are ``names`` (its recorded results)."""
        blocks_name, blocks = find_decoder_blocks(model)
        plan = cls(blocks, [{} for _ in blocks], blocks_name)
        for name in names:
            index = next(i for i in range(len(blocks)) if name.startswith(plan.prefix(i)))
            plan.modules[index][name] = model.get_submodule(name)
        return plan


def _text_config(model: nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def plan_compression(model: nn.Module, spec: PlanSpec) -> CompressionPlan:
    """Find the blocks and their compressible modules; check ``modules_to_not_convert`` (``spec.skip``),
    ``seq_len`` and ``pattern`` against the model (a ``ValueError`` naming the option, before any work)."""
    blocks_name, blocks = find_decoder_blocks(model)
    all_names = [n for n, _ in model.named_modules()]
    for entry in spec.skip:
        if entry != "lm_head" and not any(is_skipped(n, [entry]) for n in all_names):
            raise ValueError(f"modules_to_not_convert: {entry!r} matches no module of {type(model).__name__}; "
                             f"module names look like {all_names[min(5, len(all_names) - 1)]!r}")
    plan = CompressionPlan(blocks, [], blocks_name)
    for i, block in enumerate(blocks):
        plan.modules.append({plan.prefix(i) + n: m for n, m in compressible_modules(block).items()
                             if not is_skipped(plan.prefix(i) + n, spec.skip)})
    if not any(plan.modules):
        raise ValueError(f"model: {type(model).__name__} has no compressible nn.Linear/Conv1D inside its decoder "
                         f"blocks (after modules_to_not_convert={list(spec.skip)})")
    text_config = _text_config(model)
    max_positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if max_positions is not None and spec.seq_len > max_positions:
        raise ValueError(f"seq_len: {spec.seq_len} is longer than the model's {max_positions} positions; "
                         f"allowed: 1..{max_positions}")
    if spec.nm is not None:
        for name, m in plan.all_modules.items():
            cols = weight_matrix(m).shape[1]
            if cols % spec.nm[1]:
                raise ValueError(f"pattern: '{spec.nm[0]}:{spec.nm[1]}' needs the input size of every module to be a "
                                 f"multiple of M={spec.nm[1]}; {name} has {cols} inputs")
    return plan
