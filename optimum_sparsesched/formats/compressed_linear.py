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

With ``run_compressed="int4"`` (:meth:`CompressedLinear.use_int4_kernel`, :mod:`.int4_kernel`) a 4-bit module holds
instead of ``weight_codes`` the code of every weight in the layout of torch's CPU int4 matmul (``int4_codes``) and
the kernel's scales (``int4_scale_zero``), both left out of the state dict; its forward is that kernel, without a
decoded weight. Its checkpoint tensors are rebuilt from them for a save (:meth:`CompressedLinear.compact_tensors`).

With ``run_compressed="sparse"`` (:meth:`CompressedLinear.use_sparse_kernel`, :mod:`.sparse_kernel`) the module keeps
its compact tensors and runs inputs of a few rows on the CPU through the compiled sparse kernel, longer ones (and
any needing a gradient, or on another device) through the decoding below.

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
from . import int4_kernel, sparse_kernel
from .compact import SUFFIXES, pack_codes, unpack_codes, unpack_mask
from .fast_decode import DecodePlan, decode_into, dense_codes, scratch


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
        self.kernel_group: int | None = None  # the int4 kernel's group once :meth:`use_int4_kernel` ran
        self.sparse_kernel = False  # :meth:`use_sparse_kernel` ran
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

    #: float buffers that keep their dtype through ``model.to(dtype)`` (moved as the integers of their bits): the
    #: grid's bfloat16 scale, and the kernel's scales (rebuilt from the grid for a new model dtype instead)
    _FIXED_DTYPES = ("weight_scale", "int4_scale_zero")
    _SAME_SIZE_INTS = {2: torch.int16, 4: torch.int32}

    def _apply(self, fn: Any, recurse: bool = True) -> "CompressedLinear":
        kept = {name: self._buffers[name].dtype for name in self._FIXED_DTYPES if self._buffers.get(name) is not None}
        for name, dtype in kept.items():
            self._buffers[name] = self._buffers[name].view(self._SAME_SIZE_INTS[dtype.itemsize])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dtype in kept.items():
                if not self._buffers[name].is_floating_point():
                    self._buffers[name] = self._buffers[name].view(dtype)

    @property
    def has_codes(self) -> bool:
        """Whether the weights are stored as grid codes (not values)."""
        return hasattr(self, "weight_codes") or self.kernel_group is not None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave out the decoder's per-device plan
        state = dict(self.__dict__)
        state.pop("_plan", None)
        state.pop("_kernel_args", None)
        return state

    def compact_tensors(self) -> dict[str, torch.Tensor]:
        """The module's checkpoint tensors (``{suffix: tensor}`` on the CPU, with the empty ``weight`` placeholder),
        as :func:`.compact.compact_module_tensors` gives them for the decoded module."""
        out = {"weight": torch.empty(0, dtype=self.weight.dtype)}
        out.update({k: getattr(self, k).detach().cpu().contiguous() for k in SUFFIXES if hasattr(self, k)})
        if self.kernel_group is not None:
            out["weight_codes"] = self._kept_codes().cpu()
        return out

    def _kept_codes(self) -> torch.Tensor | None:
        """The packed codes of the kept weights (``weight_codes``), or None for stored values; with the int4 kernel
        read back from its codes of every weight (``cols² · rows`` multiply-adds: for a save or a decode)."""
        if self.kernel_group is None:
            return getattr(self, "weight_codes", None)
        codes = int4_kernel.kernel_codes(self.int4_codes, self.kernel_group, self.out_features, self.in_features)
        return pack_codes(codes[unpack_mask(self.weight_mask.cpu(), self.in_features)], self.bits)

    def grid(self) -> Grid | None:
        """The grid ``(scale, zero)`` float32 ``[rows, groups]`` of stored codes (as a decoding load records it),
        or None for stored values."""
        if not self.has_codes:
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
            plan = DecodePlan.of(mask, self.in_features, self.group_size if self.has_codes else None)
            self.__dict__["_plan"] = cached = ((mask.data_ptr(), mask.device), plan)
        return cached[1]

    def decode(self, reuse: bool = False) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in the model dtype: a new tensor, or with ``reuse`` one
        written into this thread's buffer, valid until the next module decodes."""
        out = scratch("weight", self.dense_numel, self.weight.dtype, self.weight_mask.device) if reuse else None
        return decode_into(self._decode_plan(), self.weight_mask, self.weight.dtype,
                           values=getattr(self, "weight_values", None), codes=self._kept_codes(),
                           scale=getattr(self, "weight_scale", None), zero=getattr(self, "weight_zero", None),
                           bits=self.bits, out=out)

    def use_int4_kernel(self) -> bool:
        """``run_compressed="int4"``: hold every weight's 4-bit code in the layout of torch's CPU int4 matmul in place
        of the kept codes, and run the forward with it (:mod:`.int4_kernel`). Returns False, changing nothing, for a
        module that cannot: stored values, not 4 bits, not on the CPU, or a shape the kernel does not take."""
        g = int4_kernel.kernel_group(self.out_features, self.in_features, self.group_size)
        if (self.kernel_group is not None or self.bits != 4 or not hasattr(self, "weight_codes") or g is None
                or self.weight_mask.device.type != "cpu"):
            return False
        scale, zero = self.grid()
        with torch.no_grad():
            codes = dense_codes(self._decode_plan(), self.weight_mask, self.weight_codes, zero, self.bits,
                                self.group_size)
            self.register_buffer("int4_codes", int4_kernel.pack(codes), persistent=False)
        del self.weight_codes
        self.kernel_group = g
        self._kernel_scale_zero()
        return True

    def use_sparse_kernel(self) -> bool:
        """``run_compressed="sparse"``: run inputs of up to :data:`.sparse_kernel.MAX_ROWS` rows on the CPU through
        the compiled sparse kernel (the compact tensors unchanged). Returns False, changing nothing, for a module
        held in the int4 kernel's layout or in a dtype the kernel does not compute (float64)."""
        if self.kernel_group is not None or self.weight.dtype not in sparse_kernel.DTYPES:
            return False
        self.sparse_kernel = True
        if self.weight_mask.device.type == "cpu":
            self._prepared()  # at load: its temporaries freed before the model runs
        return True

    def _prepared(self) -> sparse_kernel.Prepared:
        """The sparse kernel's arguments for this module, built again after a ``to()`` or a load replaced a
        tensor."""
        stored = [getattr(self, k, None) for k in ("weight_mask", "weight_values", "weight_codes", "weight_scale",
                                                   "weight_zero")]
        key = (self.weight.dtype, *(None if t is None else (t.data_ptr(), t.dtype, t.shape) for t in stored))
        cached = self.__dict__.get("_kernel_args")
        if cached is None or cached[0] != key:
            starts = self._decode_plan().starts.view(-1).to(torch.int64)
            mask, values, codes, scale, zero = stored
            self.__dict__["_kernel_args"] = cached = (key, sparse_kernel.prepare(
                mask, starts, self.in_features, self.weight.dtype, values, codes, self.bits, scale, zero,
                self.group_size))
        return cached[1]

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sparse kernel's ``linear(x)``, or None when this input goes through the decoding instead (more rows
        than the kernel takes, not on the CPU, or needing a gradient)."""
        rows = x.numel() // self.in_features if self.in_features else 0
        if (not 1 <= rows <= sparse_kernel.MAX_ROWS or x.device.type != "cpu"
                or self.weight_mask.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)
                or self.weight.dtype not in sparse_kernel.DTYPES):
            return None
        y = sparse_kernel.run(self._prepared(), x.reshape(rows, self.in_features).to(torch.float32).contiguous())
        if self.bias is not None:
            y += self.bias.to(torch.float32)
        return y.to(x.dtype).view(x.shape[:-1] + (self.out_features,))

    def _kernel_scale_zero(self) -> torch.Tensor:
        """The kernel's ``(S, Z)`` in the kernel dtype of the model dtype (:func:`.int4_kernel.kernel_dtype`), rebuilt
        from the grid after a ``model.to(dtype)`` that changes it."""
        dtype = int4_kernel.kernel_dtype(self.weight.dtype)
        sz = self._buffers.get("int4_scale_zero")
        if sz is None or sz.dtype != dtype:
            scale, zero = self.grid()
            sz = int4_kernel.scale_zero(scale, zero, self.in_features, self.group_size, self.kernel_group, dtype)
            self.register_buffer("int4_scale_zero", sz, persistent=False)
        return sz

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.int4_codes.device.type != "cpu":
            raise RuntimeError(f"run_compressed='int4' runs on the CPU (torch's int4 matmul); this input is on "
                               f"{x.device}: load with run_compressed=True (the compact form) for another device")
        # torch's int4 matmul has no derivative: a backward through it raises torch's "not implemented" error
        y = int4_kernel.matmul(x.reshape(-1, self.in_features), self.int4_codes, self.kernel_group,
                               self._kernel_scale_zero())
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(x.shape[:-1] + (self.out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_group is not None:
            return self._kernel_forward(x)
        if self.sparse_kernel:
            y = self._sparse_forward(x)
            if y is not None:
                return y
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
        stored = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        grid = f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}" if self.has_codes else "values"
        if self.kernel_group is not None:
            grid += f", int4_kernel_group={self.kernel_group}"
        if self.sparse_kernel:
            grid += ", sparse_kernel=True"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {grid}, "
                f"bias={self.bias is not None}, compact_bytes={stored}")
