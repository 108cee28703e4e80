"""`CompressedLinear`: a compressed ``nn.Linear`` (or GPT-2 ``Conv1D``) kept in the compact format in memory
(``run_compressed=True``), its weight decoded inside its forward, one module at a time.

Its buffers are the compact checkpoint's tensors under their checkpoint names (:mod:`.compact`), so the module's
state dict is the compact checkpoint again and a save writes the same tensors:

- ``weight``: the checkpoint's empty placeholder ``[0]``, in the model dtype: it carries the dtype (and device) of
  the decoded weight and follows ``model.to(dtype)`` like any float buffer;
- ``weight_mask`` uint8 ``[rows, ⌈cols/8⌉]``;
- ``weight_values`` (model dtype) ``[nnz]``; or ``weight_codes`` uint8, ``weight_scale`` bfloat16 ``[rows, groups]``
  and, for asymmetric grids, ``weight_zero`` uint8. The scale is the grid: it stays bfloat16 whatever
  ``model.to(dtype)`` does (:meth:`CompressedLinear._apply`);
- ``bias``: the dense module's parameter.

``forward(x) = linear(x, W, bias)`` with ``W`` ``[rows, cols]`` decoded by :func:`.fast_decode.decode_into`, bit for
bit :func:`.compact.decode_weight`'s (which a decoding load writes into the model). The matmul is the dense module's
own (``F.linear``, or Conv1D's ``addmm`` on the contiguous transposed weight), so outputs equal the decoded model's bit
for bit. ``W`` is written into a buffer that the next module's forward reuses (a new tensor when autograd keeps it for
a backward): the model never holds more than one decoded weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..obs.grid import Grid
from .compact import SUFFIXES, unpack_codes
from .fast_decode import DecodePlan, decode_into, scratch


class CompressedLinear(nn.Module):
    """A Linear layer stored compactly (see the module docstring). ``tensors``: the compact tensors by suffix
    (real, or meta with the checkpoint's shapes before transformers loads them); ``dtype``: the model dtype;
    ``bits``/``group_size``/``sym``: the grid of stored codes; ``transposed``: it replaces a GPT-2 ``Conv1D``
    (weight stored ``[in, out]``); ``bias``: the bias tensor or None."""

    def __init__(self, in_features: int, out_features: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 bits: int | None = None, group_size: int = -1, sym: bool = False, transposed: bool = False,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.transposed = bits, group_size, sym, transposed
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=tensors["weight_mask"].device))
        for suffix in SUFFIXES:
            if suffix in tensors:
                self.register_buffer(suffix, tensors[suffix])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def replacing(cls, module: nn.Module, tensors: dict[str, torch.Tensor], bits: int | None, group_size: int,
                  sym: bool) -> "CompressedLinear":
        """The compact stand-in of dense ``module`` (``nn.Linear`` or ``Conv1D``, possibly on the meta device) whose
        compact tensors are ``tensors`` (``{suffix: tensor}``; the ``weight`` placeholder is ignored)."""
        transposed = not isinstance(module, nn.Linear)
        cols, rows = module.weight.shape if transposed else module.weight.shape[::-1]
        stored = {k: v for k, v in tensors.items() if k in SUFFIXES}
        bias = None if module.bias is None else module.bias.data
        return cls(cols, rows, stored, module.weight.dtype, bits, group_size, sym, transposed, bias)

    @property
    def dense_numel(self) -> int:
        """Number of weights of the dense layer this module stands for."""
        return self.in_features * self.out_features

    def _apply(self, fn: Any, recurse: bool = True) -> "CompressedLinear":
        # ``model.to(dtype)`` / ``.half()`` cast float buffers: the grid's bfloat16 scale moves as its int16 bits
        scale = self._buffers.get("weight_scale")
        if scale is not None:
            self._buffers["weight_scale"] = scale.view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            scale = self._buffers.get("weight_scale")
            if scale is not None and scale.dtype == torch.int16:
                self._buffers["weight_scale"] = scale.view(torch.bfloat16)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave out the decoder's per-device plan
        state = dict(self.__dict__)
        state.pop("_plan", None)
        return state

    def compact_tensors(self) -> dict[str, torch.Tensor]:
        """The module's checkpoint tensors (``{suffix: tensor}`` on the CPU, with the empty ``weight`` placeholder),
        as :func:`.compact.compact_module_tensors` gives them for the decoded module."""
        out = {"weight": torch.empty(0, dtype=self.weight.dtype)}
        out.update({k: getattr(self, k).detach().cpu().contiguous() for k in SUFFIXES if hasattr(self, k)})
        return out

    def grid(self) -> Grid | None:
        """The grid ``(scale, zero)`` float32 ``[rows, groups]`` of stored codes (as a decoding load records it),
        or None for stored values."""
        if not hasattr(self, "weight_codes"):
            return None
        scale = self.weight_scale.to(torch.float32)
        zero = getattr(self, "weight_zero", None)
        if zero is None:
            return scale, torch.full_like(scale, 2.0 ** (self.bits - 1))
        return scale, unpack_codes(zero, self.bits, scale.numel()).to(torch.float32).view(scale.shape)

    def _decode_plan(self) -> DecodePlan:
        """The decoder's per-module state (:class:`.fast_decode.DecodePlan`), built once per mask and device."""
        mask = self.weight_mask
        cached = self.__dict__.get("_plan")
        if cached is None or cached[0] != (mask.data_ptr(), mask.device):
            plan = DecodePlan.of(mask, self.in_features, self.group_size if hasattr(self, "weight_codes") else None)
            self.__dict__["_plan"] = cached = ((mask.data_ptr(), mask.device), plan)
        return cached[1]

    def decode(self, reuse: bool = False) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in the model dtype: a new tensor, or with ``reuse`` one
        written into this thread's buffer, valid until the next module decodes."""
        out = scratch("weight", self.dense_numel, self.weight.dtype, self.weight_mask.device) if reuse else None
        return decode_into(self._decode_plan(), self.weight_mask, self.weight.dtype,
                           values=getattr(self, "weight_values", None), codes=getattr(self, "weight_codes", None),
                           scale=getattr(self, "weight_scale", None), zero=getattr(self, "weight_zero", None),
                           bits=self.bits, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the reused buffer only when autograd keeps no reference to the weight for a backward
        weight = self.decode(reuse=not (torch.is_grad_enabled() and x.requires_grad))
        if self.transposed:  # transformers' Conv1D.forward, on its [in, out] weight
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), weight.t().contiguous())
            return out.view(x.size()[:-1] + (self.out_features,))
        return F.linear(x, weight, self.bias)

    def to_dense(self) -> nn.Module:
        """The dense module this one stands for (``nn.Linear``, or ``Conv1D`` when ``transposed``), its weight
        decoded."""
        weight = self.decode()
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features)
            dense.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
        dense.bias = None if self.bias is None else nn.Parameter(self.bias.data, requires_grad=False)
        return dense

    def extra_repr(self) -> str:
        stored = sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in SUFFIXES if hasattr(self, k))
        codes = hasattr(self, "weight_codes")
        grid = f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}" if codes else "values"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {grid}, "
                f"bias={self.bias is not None}, compact_bytes={stored}")
