"""``run_compressed=True``: a compressed checkpoint loaded with its compact Linears kept compact in memory
(:class:`.compressed_linear.CompressedLinear`), and what saving or dequantizing such a model needs.

``from_pretrained(OUT, quantization_config=SparseScheduleConfig(run_compressed=True))`` — a loading attribute that
transformers merges into the checkpoint's own config (``get_loading_attributes``) — makes the quantizer:

1. before any tensor is read (:func:`replace_compact_modules`), read the safetensors headers of the checkpoint and
   replace every compressed module stored compactly (``{name}.weight_mask`` present) by a ``CompressedLinear`` whose
   meta buffers have the checkpoint's names, shapes and dtypes (values in the model dtype);
2. while loading, hand each such module's tensors to the load operation (:mod:`.compact_load`), which checks them as
   a decoding load does and passes them through into the buffers — no dense weight is ever built — and records the
   module as loaded (a module whose tensors are missing is refused after the load, as for a decoding load);
3. after loading (:func:`encode_dense_modules`), for a checkpoint saved with ``export_format="dense"`` (no compact
   tensors on disk), encode each compressed Linear now, one at a time (the load itself then peaks at the dense model).

A module the checkpoint stores densely (compact would not be smaller) stays an ``nn.Linear``.

``run_compressed="int4"`` (a 4-bit checkpoint, on the CPU) then converts each 4-bit ``CompressedLinear`` to the layout
of torch's int4 matmul (:func:`use_int4_kernels`, :mod:`.int4_kernel`): faster than decoding, larger than compact.
``run_compressed="sparse"`` keeps the compact form and runs short inputs on the CPU through a kernel compiled at load
(:func:`use_sparse_kernels`, :mod:`.sparse_kernel`).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ..obs.grid import Grid
from ..pipeline.host_memory import release_free_memory
from ..pipeline.plan import weight_matrix
from . import int4_kernel, sparse_kernel
from .compact import SUFFIXES, compact_module_tensors
from .compressed_linear import CompressedLinear
from .metadata import read_safetensors_header
from .spec import ExportSpec

logger = logging.getLogger(__name__)

#: safetensors dtype names of the tensors a compact checkpoint holds
_DTYPES = {"U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64}


def checkpoint_layout(files: Iterable[str]) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of every tensor in the safetensors ``files`` (headers only; dtype None when it is
    not one a compact checkpoint uses)."""
    layout = {}
    for path in files:
        header = read_safetensors_header(path) if str(path).endswith(".safetensors") else None
        for key, entry in (header or {}).items():
            if key != "__metadata__" and isinstance(entry, dict):
                layout[key] = (_DTYPES.get(entry.get("dtype")), tuple(entry.get("shape", ())))
    return layout


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_compact_modules(model: nn.Module, checkpoint_files: Iterable[str], spec: ExportSpec,
                            names: Iterable[str]) -> list[str]:
    """Before loading: every compressed module of ``names`` that ``checkpoint_files`` store compactly becomes a
    meta ``CompressedLinear`` with the checkpoint's tensor shapes (``spec``: the grid they were encoded on). Returns
    the names replaced."""
    layout = checkpoint_layout(checkpoint_files)
    replaced = []
    for name in names:
        if f"{name}.weight_mask" not in layout:
            continue
        module = model.get_submodule(name)
        meta = {}
        for suffix in SUFFIXES:
            if f"{name}.{suffix}" in layout:
                stored, shape = layout[f"{name}.{suffix}"]
                if stored is None:
                    raise ValueError(f"{name}.{suffix}: the checkpoint stores it with a dtype a compact checkpoint "
                                     "never uses; the checkpoint is damaged")
                dtype = module.weight.dtype if suffix == "weight_values" else stored
                meta[suffix] = torch.empty(shape, dtype=dtype, device="meta")
        _set_submodule(model, name, CompressedLinear.replacing(module, meta, spec.bits, spec.group_size, spec.sym))
        replaced.append(name)
    return replaced


def compressed_linears(model: nn.Module) -> dict[str, CompressedLinear]:
    """Every ``CompressedLinear`` of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


def encode_dense_modules(model: nn.Module, spec: ExportSpec, names: Iterable[str],
                         grids: dict[str, Grid]) -> list[str]:
    """After a ``run_compressed`` load: replace each compressed module of ``names`` still dense (a checkpoint saved
    with ``export_format="dense"``) by a ``CompressedLinear`` holding the tensors a compact save would write for it
    (:func:`.compact.compact_module_tensors`, on its grid from ``grids`` if known, else mask and values; a module for
    which compact is not smaller stays dense), one module at a time. Returns the names replaced."""
    compact = ExportSpec("compact", spec.bits, spec.group_size, spec.sym)
    replaced = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, CompressedLinear):
            continue
        with torch.no_grad():
            tensors = compact_module_tensors(weight_matrix(module), grids.get(name), compact)
        if tensors is None:
            continue
        tensors = {k: v.to(module.weight.device) for k, v in tensors.items()}
        _set_submodule(model, name, CompressedLinear.replacing(module, tensors, spec.bits, spec.group_size, spec.sym))
        replaced.append(name)
    return replaced


def check_int4_kernel(bits: int | None) -> None:
    """Before loading with ``run_compressed="int4"``: the checkpoint has 4-bit codes (``bits``) and torch the
    kernel; else a ``ValueError`` naming the option and its values."""
    if bits != 4:
        raise ValueError(f"run_compressed='int4' runs 4-bit codes; this checkpoint stores bits={bits}. Allowed for it: "
                         "run_compressed=True or 'compact' (decoded inside each forward) or False (decoded at load)")
    if not int4_kernel.kernel_available():
        raise ValueError(f"run_compressed='int4' needs torch's CPU int4 matmul, which torch {torch.__version__} lacks; "
                         "use run_compressed=True or 'compact'")


def check_sparse_kernel() -> None:
    """Before loading with ``run_compressed="sparse"``: the kernel builds here (:func:`.sparse_kernel.load`); else a
    ``ValueError`` naming the option, the reason and the other values."""
    reason = sparse_kernel.unavailable_reason()
    if reason is not None:
        raise ValueError(f"run_compressed='sparse' compiles a C kernel at load, which failed here: {reason}. Set CC "
                         "to a C compiler, or use run_compressed=True or 'compact' (decoded inside each forward), "
                         "'int4' (4-bit checkpoints) or False (decoded at load)")


def use_sparse_kernels(model: nn.Module) -> list[str]:
    """After a ``run_compressed="sparse"`` load: every ``CompressedLinear`` runs short CPU inputs through the sparse
    kernel (:meth:`.compressed_linear.CompressedLinear.use_sparse_kernel`). Returns the names of the modules left
    to the decoding (a warning names them)."""
    left = [name for name, module in compressed_linears(model).items() if not module.use_sparse_kernel()]
    release_free_memory()  # the arguments' temporaries (a few bytes per weight of each mask), given back
    if left:
        logger.warning("run_compressed='sparse': %d compressed Linears are decoded in their forward instead (the "
                       "kernel computes float32, bfloat16 and float16 models); e.g. %s", len(left),
                       ", ".join(left[:3]))
    return left


def use_int4_kernels(model: nn.Module) -> list[str]:
    """After a ``run_compressed="int4"`` load: every 4-bit ``CompressedLinear`` on the CPU whose shape the kernel
    takes holds its codes in the kernel's layout (:meth:`.compressed_linear.CompressedLinear.use_int4_kernel`), one
    module at a time, the C heap's free pages given back after each (the conversion's temporaries, several bytes per
    weight, were otherwise kept by glibc's heaps between the modules' long-lived codes: 0.5–4× the converted model's
    bytes in as many runs of the same load). Returns the names of the modules left in the compact form (a warning
    names them)."""
    left = []
    for name, module in compressed_linears(model).items():
        if not module.use_int4_kernel():
            left.append(name)
        release_free_memory()
    if left:
        logger.warning("run_compressed='int4': %d compressed Linears stay in the compact form (decoded in their "
                       "forward): the kernel needs 4-bit codes on the CPU, rows a multiple of 16 and groups of 32, "
                       "64, 128 or 256 columns; e.g. %s", len(left), ", ".join(left[:3]))
    return left


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``CompressedLinear`` by the dense module it stands for (its weight decoded), one at a time."""
    for name, module in compressed_linears(model).items():
        _set_submodule(model, name, module.to_dense())
    return model
