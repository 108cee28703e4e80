"""What lives on the compute device during a compression (:mod:`..sequential`), under an optional byte budget
(``SparseScheduleConfig.max_device_memory``).

Policy. The model stays where it was loaded (CPU by default). On the compute device there is at any time only the
current decoder block with its OBS working set (its Hessians, the working copy of the module being solved, one
window's forward), or, during the capture and the schedule's damage measurement, the modules outside the blocks.
The calibration activations (every window's hidden states between two blocks, the blocks' extra arguments and the
schedule's probe streams) join them on the device only if they fit in what the budget leaves; otherwise they stay
in CPU memory (pinned when CUDA is available, so the per-window copies are fast) and each window visits the device
for its block forward. If even one block's working set exceeds the budget, the run is refused before any work.
Where the activations live changes no number: every forward runs on the compute device either way.

Accounting (bytes; ``e`` = bytes per element of the model dtype, float32 = 4; per block ``b``; ``cols_m``,
``rows_m`` = the input/output features of compressible module ``m``; ``S`` = ``seq_len``; ``d`` = hidden size;
``a`` = attention heads; ``V`` = vocabulary; ``B`` = OBS ``block_size``; ``n`` = calibration windows on this
rank; ``p`` = probe windows; ``k`` = damage streams of the schedule (1 for ``"hessian"`` with a KL metric, else 0);
``L`` = blocks):

- block weights ``W_b`` = Σ bytes of the block's parameters and buffers (as stored);
- Hessians ``H_b = 4·(3·Σ_m cols_m² + 3·max_m cols_m²)``: per module its float64 sum ``S`` (two float32 units,
  freed when its ``H`` is handed over), then the damped copy and the Cholesky factor ``U`` of ``H⁻¹``, plus one
  window's float32 product or one factorisation's temporaries (identity, ``L``, ``H⁻¹``). Modules
  reading the same input (q/k/v, gate/up) share one Hessian in fact; counting one per module is an upper bound
  (+20–30% on the Hessian term of Llama blocks), since the sharing is only known after a forward;
- OBS working copy ``O_b = 4·(3·rows·cols + 5·rows·B)`` for the module with the most weights: the float32 copy, the
  scan's result, the cast back to the model dtype, and the per-column-block buffers (``W1``, ``Q1``, ``Err1``,
  mask, saliencies);
- one window's forward ``F_b = e·S·(2d + Σ_m rows_m) + 4·a·S² + 4·2·S·max_m cols_m``: the hidden state in and
  out, every module's output, float32 attention scores (eager attention; fused kernels need less), and the
  Hessian hook's float32 copies of one input;
- schedule copy ``P_b = W_b`` when the schedule measures end-to-end damage (it prunes a copy of the block), else 0;
- block reconstruction (``reconstruct_epochs > 0``) ``R_b = (2e + 21)·Σ_m rows_m·cols_m + 3·F_b``: per weight the
  solver's copy and the gradient in the model dtype, the float32 master copy, Adam's two moments, two float32
  gradient copies and the mask byte; autograd's saved activations of one window's forward; it runs after the
  Hessians are freed;
- block phase ``= max_b (W_b + P_b + max(H_b + max(O_b, F_b), R_b))`` (the forward temporaries are freed before OBS
  runs);
- outside-block phase ``= E + W_0 + F_0 + 2·e·S·d + [k > 0]·4·3·S·V`` with ``E`` the bytes of the modules outside
  the blocks (embeddings, final norm, head, rotary tables): the capture (block 0 runs once there) and the damage
  measurement (logits, reference and perturbed log-probabilities of one window);
- working set ``= max(block phase, outside-block phase)``: must be ≤ the budget;
- activations ``A`` = the captured tensors as measured (hidden states of the ``n`` windows, the blocks' extra
  arguments, each distinct storage once) ``+ e·S·d·(1 + p·(2 + k·L))``: one block output in flight, and the
  schedule's dense probe inputs/outputs and its ``k·L`` damage streams of ``p`` windows; with block
  reconstruction ``+ 2·`` the captured hidden states (the dense model's stream beside them, and its next block's
  outputs while they are computed);
- activations on the device iff ``working set + A ≤ budget`` (no budget: the device's free memory on CUDA, always
  on CPU, where the compute device is the host memory anyway). Peak on the device: ``working set + A`` when they
  fit, else ``working set`` (the per-window copies are in ``F``).

A budget bounds what ``compress`` places on the device: parameters a ``device_map`` already put on a GPU are not
counted (blocks that already live on a GPU are compressed there, where accelerate's hooks expect them). Weights
offloaded by accelerate (parameters on the ``meta`` device) are onloaded one block at a time
(:mod:`.sources`); in host memory a run then holds one block, not the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .blocks import BlockInputs, non_block_modules, to_device
from .sizes import format_bytes, parse_memory_size, tensor_bytes
from .offload import check_offloaded_weights
from .plan import CompressionPlan, weight_matrix

logger = logging.getLogger(__name__)

FLOAT32 = 4

@dataclass(frozen=True)
class ResidencySpec:
    """What the accounting uses: ``seq_len`` and OBS ``block_size``; ``damage_streams`` (``k`` below: 1 when the
    schedule measures end-to-end damage, else 0); ``reconstruct``: block reconstruction runs; ``budget``:
    ``max_device_memory`` in bytes (``None``: no cap)."""

    seq_len: int
    block_size: int = 128
    damage_streams: int = 0
    reconstruct: bool = False
    budget: int | None = None


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ---------------------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class WorkingSet:
    """Peak bytes on the compute device without the calibration activations (see the module docstring)."""

    block: int  # index of the block with the largest block phase
    weights: int
    hessians: int
    obs: int
    forward: int
    schedule_copy: int
    outside_blocks: int
    reconstruction: int = 0

    @property
    def block_phase(self) -> int:
        return self.weights + self.schedule_copy + max(self.hessians + max(self.obs, self.forward),
                                                       self.reconstruction)

    @property
    def total(self) -> int:
        return max(self.block_phase, self.outside_blocks)

    def describe(self) -> str:
        return (f"block {self.block}: weights {format_bytes(self.weights)} + Hessians {format_bytes(self.hessians)} "
                f"+ max(OBS copy {format_bytes(self.obs)}, one window's forward {format_bytes(self.forward)})"
                + (f" + the schedule's pruned copy {format_bytes(self.schedule_copy)}" if self.schedule_copy else "")
                + (f" (block reconstruction {format_bytes(self.reconstruction)} after the Hessians are freed)"
                   if self.reconstruction else "")
                + f"; outside-block phase {format_bytes(self.outside_blocks)}")


def _text_config_value(model: nn.Module, *names: str, default: int = 0) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def estimate_working_set(model: nn.Module, blocks: nn.ModuleList, modules: list[dict[str, nn.Module]],
                         spec: ResidencySpec) -> WorkingSet:
    """The working set of the largest block (``modules[i]``: block ``i``'s compressible modules) under ``spec``."""
    damage_streams = spec.damage_streams
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    e = embeddings.weight.element_size() if embeddings is not None else next(model.parameters()).element_size()
    S = spec.seq_len
    d = _text_config_value(model, "hidden_size", "n_embd", "d_model",
                           default=getattr(embeddings, "embedding_dim", 0) or 0)
    heads = _text_config_value(model, "num_attention_heads", "n_head", "num_heads", default=1)
    vocab = _text_config_value(model, "vocab_size", default=getattr(embeddings, "num_embeddings", 0) or 0)
    best: WorkingSet | None = None
    forward0 = 0
    for index, (block, group) in enumerate(zip(blocks, modules)):
        shapes = [tuple(weight_matrix(m).shape) for m in group.values()] or [(0, 0)]
        weights = module_bytes(block)
        max_cols = max(c for _, c in shapes)
        hessians = FLOAT32 * (3 * sum(c * c for _, c in shapes) + 3 * max_cols * max_cols)
        rows, cols = max(shapes, key=lambda rc: rc[0] * rc[1])
        obs = FLOAT32 * (3 * rows * cols + 5 * rows * min(spec.block_size, max(cols, 1)))
        forward = e * S * (2 * d + sum(r for r, _ in shapes)) + FLOAT32 * heads * S * S + FLOAT32 * 2 * S * max_cols
        if index == 0:
            forward0 = weights + forward
        reconstruction = (2 * e + 21) * sum(r * c for r, c in shapes) + 3 * forward if spec.reconstruct else 0
        ws = WorkingSet(index, weights, hessians, obs, forward, weights if damage_streams else 0, 0, reconstruction)
        if best is None or ws.block_phase > best.block_phase:
            best = ws
    assert best is not None
    outside = sum(module_bytes(m) for m in non_block_modules(model, {id(b) for b in blocks}))
    outside += forward0 + 2 * e * S * d + (FLOAT32 * 3 * S * vocab if damage_streams else 0)
    return WorkingSet(best.block, best.weights, best.hessians, best.obs, best.forward, best.schedule_copy, outside,
                      best.reconstruction)


def activation_bytes(inputs: BlockInputs, probe_windows: int, damage_streams: int, reconstruct: bool = False) -> int:
    """``A`` of the module docstring: the captured tensors as stored, plus one output in flight, the schedule's
    probe windows (dense inputs/outputs and ``damage_streams`` (= k) × L damage streams) and, with ``reconstruct``,
    two more copies of the hidden states (the dense stream and its next outputs)."""
    window = max((h.numel() * h.element_size() for h in inputs.hidden), default=0)
    captured = tensor_bytes(_tensors([inputs.hidden, inputs.args, inputs.kwargs]))
    dense = 2 * tensor_bytes(inputs.hidden) if reconstruct else 0
    return captured + dense + window * (1 + probe_windows * (2 + damage_streams * len(inputs.args)))


# ---------------------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Residency:
    """The decision: where the activations are stored, and the figures it was made on."""

    device: torch.device  # the compute device
    storage: torch.device  # where the calibration activations live
    activations_on_device: bool
    pin_memory: bool
    budget: int | None
    working_set: int
    activations: int

    @property
    def peak(self) -> int:
        """Estimated peak bytes on the compute device."""
        return self.working_set + (self.activations if self.activations_on_device else 0)


def require_fit(working_set: int, budget: int | None, detail: str = "") -> None:
    """Raise before any work when one block's working set alone exceeds ``budget``."""
    if budget is not None and working_set > budget:
        raise ValueError(
            f"max_device_memory: {format_bytes(budget)} cannot hold one decoder block's working set, which needs "
            f"{format_bytes(working_set)}" + (f" ({detail})" if detail else "") + "; allowed: None (no cap) or a "
            f"budget of at least {working_set} bytes. A smaller seq_len or block_size lowers the need.")


def decide_residency(working_set: int, activations: int, budget: int | None, device: torch.device | str,
                     free_bytes: int | None = None, cuda_available: bool | None = None,
                     detail: str = "") -> Residency:
    """Pure decision on sizes in bytes. ``budget``: ``max_device_memory`` (None = no cap); ``free_bytes``: what the
    device has free, used when there is no budget (None: unlimited). Raises when the working set does not fit."""
    device = torch.device(device)
    require_fit(working_set, budget, detail)
    room = budget if budget is not None else free_bytes
    on_device = room is None or working_set + activations <= room
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    storage = device if on_device else torch.device("cpu")
    return Residency(device=device, storage=storage, activations_on_device=on_device,
                     pin_memory=not on_device and cuda, budget=budget, working_set=working_set,
                     activations=activations)


def compute_device() -> torch.device:
    """Where blocks are compressed: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on CPU: no separate device memory)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None


# ---------------------------------------------------------------------------------------------- applying it
def place_activations(inputs: BlockInputs, residency: Residency) -> BlockInputs:
    """Move the captured activations to ``residency.storage`` (shared tensors stay shared) and pin them in CPU memory
    when asked. Values are unchanged."""
    memo: dict[int, Any] = {}
    inputs.hidden = [_place(h, residency, memo) for h in inputs.hidden]
    inputs.args = [to_device(a, residency.storage, memo) for a in inputs.args]
    inputs.kwargs = [to_device(k, residency.storage, memo) for k in inputs.kwargs]
    return inputs


def _place(t: torch.Tensor, residency: Residency, memo: dict[int, Any]) -> torch.Tensor:
    t = to_device(t, residency.storage, memo)
    if residency.pin_memory and t.device.type == "cpu" and not t.is_pinned():
        try:
            t = t.pin_memory()
        except RuntimeError as exc:  # pinned memory is a limited resource; pageable copies still work
            logger.warning("could not pin a calibration window in CPU memory (%s); it stays pageable", exc)
    return t


def store(out: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """A block output kept where ``previous`` (the window it replaces) lives: copied into ``previous``'s pinned
    buffer when there is one, else moved there."""
    if previous.is_pinned() and previous.shape == out.shape and previous.dtype == out.dtype:
        return previous.copy_(out)
    return out.to(previous.device)


def plan_residency(model: nn.Module, plan: CompressionPlan, spec: ResidencySpec, write_back: bool = True) -> WorkingSet:
    """Before any work: check that offloaded weights can be read (and, with ``write_back``, that the compressed
    modules' stores can be written: :func:`.offload.check_offloaded_weights`) and that one block's working set fits
    ``max_device_memory``. Returns the working-set estimate for :func:`decide_for_inputs`."""
    check_offloaded_weights(model, {id(m) for m in plan.all_modules.values()} if write_back else None)
    working = estimate_working_set(model, plan.blocks, plan.modules, spec)
    require_fit(working.total, spec.budget, working.describe())
    return working


def decide_for_inputs(inputs: BlockInputs, working: WorkingSet, spec: ResidencySpec, device: torch.device,
                      probe_windows: int) -> Residency:
    """After the capture: decide where the activations live, move them there, and log the figures."""
    residency = decide_residency(working.total, activation_bytes(inputs, probe_windows, spec.damage_streams,
                                                                 spec.reconstruct),
                                 spec.budget, device, free_device_memory(device), detail=working.describe())
    place_activations(inputs, residency)
    logger.info("device memory: working set %s, activations %s %s", format_bytes(residency.working_set),
                format_bytes(residency.activations),
                "on the device" if residency.activations_on_device
                else "in CPU memory" + (" (pinned)" if residency.pin_memory else ""))
    return residency


__all__ = ["Residency", "ResidencySpec", "WorkingSet", "parse_memory_size", "activation_bytes", "compute_device", "decide_residency",
           "decide_for_inputs", "estimate_working_set", "format_bytes", "place_activations", "plan_residency",
           "require_fit", "store"]
