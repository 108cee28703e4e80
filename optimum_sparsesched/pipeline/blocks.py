"""Decoder blocks: find them, capture what the model feeds them, and replay them one at a time.

SparseGPT compresses a model block by block: the inputs of block ``i+1`` are the outputs of the already
compressed block ``i``. For that we need (a) the hidden states entering block 0 for every calibration window and
(b) the other arguments the model passes to each block — attention masks, rotary ``position_embeddings``,
ALiBi tensors, ``position_ids`` — which may differ from block to block (Gemma-3 alternates sliding-window and
global attention, each with its own mask and rotary table).

Capture runs the model's own forward once per window with every block's ``forward`` temporarily replaced by a
recorder: it stores the block's arguments and returns its input unchanged (in the block's own output structure,
learnt from one real call of block 0), so no block weights are needed for the capture; the forward is stopped
after the last block. Only the modules outside the blocks (embeddings, rotary tables, ...) run on the device.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from .offload import has_offloaded_weights, hooks_executing_on


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the decoder blocks: the one with the most parameters.

    Returns ``(qualified name, ModuleList)``. Works for ``model.layers`` (Llama, Qwen2, Gemma-3),
    ``model.decoder.layers`` (OPT), ``transformer.h`` (GPT-2, BLOOM) and most other layouts.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None or best[0] == 0:
        raise ValueError(f"model: no decoder blocks (nn.ModuleList of layers) found in {type(model).__name__}")
    return best[1], best[2]


def to_device(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move every tensor in a nested structure of tuples/lists/dicts to ``device``. With a ``memo`` dict shared
    between calls, a tensor met again (the same object) is moved once and stays shared."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is held so its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What the blocks are fed during calibration.

    ``hidden``: list (one per window) of block-0 input hidden states ``[1, seq_len, hidden]``, later replaced in
    place by each block's outputs. ``args[i]``/``kwargs[i]``: the extra positional and keyword arguments of block
    ``i`` (identical for all windows: same length, no padding). ``returns_tuple``: the block's output structure.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    returns_tuple: bool = False


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device | str,
                         storage_device: torch.device | str = "cpu",
                         visit_first: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> BlockInputs:
    """Run the model's forward on each window ``[1, seq_len]`` of ``windows`` ``[n, seq_len]`` and record the
    block inputs. Blocks stay where they are (block 0 runs once, inside ``visit_first()`` — the block visit of
    :mod:`.sources`, which materialises it on the compute device; by default it is already there — to learn the
    output structure); every other module is moved to ``device`` for the capture and moved back afterwards."""
    _, blocks = find_decoder_blocks(model)
    captured = BlockInputs(args=[()] * len(blocks), kwargs=[{}] * len(blocks))
    originals = [b.forward for b in blocks]
    memo: dict[int, Any] = {}  # arguments shared between blocks (rotary tables, masks) are stored once

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                captured.hidden.append(hidden_states.detach().to(storage_device))
            if len(captured.hidden) == 1:  # first window: record this block's extra arguments
                captured.args[index] = to_device(args, storage_device, memo)
                captured.kwargs[index] = to_device(kwargs, storage_device, memo)
            if index == 0 and len(captured.hidden) == 1:
                with visit_first():
                    out = originals[0](hidden_states, *args, **kwargs)
                captured.returns_tuple = isinstance(out, tuple)
            if index == len(blocks) - 1:
                raise _StopForward
            return (hidden_states, None) if captured.returns_tuple else hidden_states
        return forward

    with head_and_embeddings_on(model, device), forwards_replaced(blocks, recorder):
        for row in windows:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    return captured


@contextmanager
def forwards_replaced(blocks: nn.ModuleList, make_forward: Callable[[int], Callable]) -> Iterator[None]:
    """Replace the ``forward`` of every block ``i`` by ``make_forward(i)`` for the duration (an instance
    attribute, so the class stays as it is; an instance ``forward`` already there, such as accelerate's hook
    wrapper, is put back afterwards)."""
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for i, b in enumerate(blocks):
            b.forward = make_forward(i)
        yield
    finally:
        for b, previous in zip(blocks, saved):
            if previous is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = previous


@contextmanager
def head_and_embeddings_on(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Move every module outside the decoder blocks (embeddings, rotary tables, final norm, lm_head) to
    ``device`` for the duration, then back where each was. Modules whose weights accelerate offloaded stay where
    they are: their hooks onload them for each forward, on ``device``."""
    _, blocks = find_decoder_blocks(model)
    others = non_block_modules(model, {id(b) for b in blocks})
    movable = [m for m in others if not has_offloaded_weights(m)]
    homes = [module_device(m) for m in movable]
    try:
        with hooks_executing_on([model], device):
            for m in movable:
                m.to(device)
            yield
    finally:
        for m, home in zip(movable, homes):
            m.to(home)


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, device: torch.device | str,
              returns_tuple: bool) -> torch.Tensor:
    """One block forward on one window: ``hidden`` ``[1, seq_len, hidden]`` -> output hidden states."""
    out = block(hidden.to(device), *to_device(args, device), **to_device(kwargs, device))
    return out[0] if returns_tuple else out


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def block_device(block: nn.Module, default: torch.device) -> torch.device:
    """Where a block is compressed: on its own GPU when a ``device_map`` put it there (accelerate's hooks send its
    inputs there), else on ``default``."""
    home = module_device(block)
    return home if home.type not in ("cpu", "meta") else default


def non_block_modules(model: nn.Module, block_ids: set[int]) -> list[nn.Module]:
    """The largest modules that contain no decoder block (embeddings, norms, rotary tables, lm_head ...)."""
    out: list[nn.Module] = []

    def contains_block(m: nn.Module) -> bool:
        return any(id(s) in block_ids for s in m.modules())

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if id(child) in block_ids:
                continue
            if contains_block(child):
                walk(child)
            else:
                out.append(child)

    walk(model)
    return out
