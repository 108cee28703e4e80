"""Weights offloaded by accelerate: onload a module's weights for a while, and write updated weights back to where
they live. No offload machinery of our own: everything goes through accelerate's hooks and weights maps.

A model loaded with a ``device_map`` that sends modules to ``"disk"`` (or to ``"cpu"`` while the main device is a
GPU), or wrapped by ``accelerate.cpu_offload``/``disk_offload``, holds those modules' parameters on the ``meta``
device. Each such module carries an ``AlignDevicesHook`` with ``offload=True`` whose ``weights_map`` (an
``accelerate.utils.PrefixedDataset`` over an ``OffloadedWeightsLoader`` or a plain dict) yields the values: from a
CPU state dict, from ``.dat`` memory maps in the ``offload_folder``, or straight from the checkpoint's safetensors
shards (transformers points its disk-offload index at them). The hook onloads them before each forward and drops
them after it.

For compression a block is onloaded once per visit (:func:`onloaded`): its offloaded tensors are read from their
weights maps onto the compute device and the hooks are frozen (``offload=False``) so the many forwards of the
visit use those tensors as they are (and see the weights the visit changes). Updated weights are written back
(:func:`write_back`) to the store they came from: a CPU dict entry is replaced; a disk store gets a new ``.dat`` in
the offload folder through ``accelerate.utils.offload_weight`` (written under a temporary name and renamed, so
ranks sharing the folder never read half a file) and its index entry now points there — a checkpoint shard the
index pointed at is never written to. Afterwards the tensors go back to ``meta`` and the hooks resume.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight, set_module_tensor_to_device
from accelerate.utils.modeling import named_module_tensors


def align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook``s attached to ``module`` (unwrapping a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def offload_hook(module: nn.Module):
    """The hook that offloads ``module``'s own tensors (``offload=True``), or None."""
    return next((h for h in align_hooks(module) if h.offload), None)


def _hook_tensor_names(module: nn.Module, hook) -> list[str]:
    """The tensors a hook onloads and drops, named relative to ``module`` (as its weights map names them)."""
    return [n for n, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                               recurse=hook.place_submodules, remove_non_persistent=True)]


def has_offloaded_weights(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is on the ``meta`` device (offloaded, or never loaded)."""
    return any(p.device.type == "meta" for p in module.parameters())


@dataclass
class OffloadedTensor:
    """One offloaded tensor: ``holder`` (the module with the hook) has it under ``name`` (relative to ``holder``)."""

    holder: nn.Module
    hook: object
    name: str

    def store(self) -> tuple[Mapping, str]:
        """The mapping the value lives in and its key there (the weights map's prefixes resolved)."""
        store, key = self.hook.weights_map, self.name
        while isinstance(store, PrefixedDataset):
            store, key = store.dataset, store.prefix + key
        return store, key


def offloaded_tensors(root: nn.Module) -> dict[tuple[int, str], OffloadedTensor]:
    """Every offloaded tensor under ``root``, keyed by ``(id(owning module), attribute name)``."""
    found: dict[tuple[int, str], OffloadedTensor] = {}
    for holder in root.modules():
        hook = offload_hook(holder)
        if hook is None:
            continue
        for name in _hook_tensor_names(holder, hook):
            owner_path, _, attr = name.rpartition(".")
            owner = holder.get_submodule(owner_path) if owner_path else holder
            found[(id(owner), attr)] = OffloadedTensor(holder, hook, name)
    return found


def store_problem(entry: OffloadedTensor) -> str | None:
    """Why an updated value of ``entry`` could not be written back (None: it can)."""
    store, key = entry.store()
    if isinstance(store, OffloadedWeightsLoader):
        if key in store.state_dict or store.save_folder is not None:
            return None
        return ("it is read from a checkpoint shard and the model has no offload folder to write the compressed "
                "weight to; load it with from_pretrained(..., device_map=..., offload_folder=FOLDER)")
    if isinstance(store, MutableMapping):
        return None
    return f"its weights map is a read-only {type(store).__name__}"


def write_back(entry: OffloadedTensor, value: torch.Tensor) -> None:
    """Make ``value`` the stored value of ``entry`` (see the module docstring); the source files are never written."""
    store, key = entry.store()
    value = value.detach().to("cpu").contiguous()
    if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
        if store.save_folder is None:
            raise ValueError(f"offload_folder: cannot write {key}: {store_problem(entry)}")
        folder = str(store.save_folder)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".sparsesched-") as tmp:
            info = offload_weight(value, key, tmp, index={})[key]
            os.replace(os.path.join(tmp, f"{key}.dat"), os.path.join(folder, f"{key}.dat"))
        store.index[key] = info
    elif isinstance(store, OffloadedWeightsLoader):
        store.state_dict[key] = value
    elif isinstance(store, MutableMapping):
        store[key] = value
    else:
        raise TypeError(f"cannot write {key} back: {store_problem(entry)}")


@contextmanager
def hooks_executing_on(modules: list[nn.Module], device: torch.device | str) -> Iterator[None]:
    """Point every accelerate hook inside ``modules`` at ``device`` for the duration (they move inputs there)."""
    saved = [(h, h.execution_device) for m in modules for sub in m.modules() for h in align_hooks(sub)]
    try:
        for h, _ in saved:
            h.execution_device = device
        yield
    finally:
        for h, original in saved:
            h.execution_device = original


@contextmanager
def onloaded(tensors: dict[tuple[int, str], OffloadedTensor], device: torch.device | str) -> Iterator[None]:
    """Read every tensor of ``tensors`` (:func:`offloaded_tensors`) from its weights map onto ``device`` and freeze
    its hook for the duration; afterwards the tensors are dropped to ``meta`` again and the hooks resume."""
    holders = {id(e.holder): e for e in tensors.values()}
    try:
        for e in tensors.values():
            set_module_tensor_to_device(e.holder, e.name, device, value=e.hook.weights_map[e.name])
        for e in holders.values():
            e.hook.offload = False
        yield
    finally:
        for e in tensors.values():
            set_module_tensor_to_device(e.holder, e.name, "meta")
        for e in holders.values():
            e.hook.offload = True


def check_offloaded_weights(model: nn.Module, writable: set[int] | None = None) -> None:
    """Before any work: every ``meta`` parameter must be offloaded by an accelerate hook, and those of the modules
    whose ids are in ``writable`` (the modules compression rewrites) must have a store the result can go to."""
    entries = offloaded_tensors(model)
    for name, p in model.named_parameters():
        if p.device.type != "meta":
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        entry = entries.get((id(owner), attr))
        if entry is None:
            raise ValueError(f"model: parameter {name!r} is on the meta device and no accelerate offload hook holds "
                             "its value; load the weights (from_pretrained, or a device_map with 'cpu'/'disk' "
                             "offload) before compressing")
        problem = store_problem(entry) if writable is not None and id(owner) in writable else None
        if problem:
            raise ValueError(f"offload_folder: parameter {name!r} is offloaded to disk but {problem}")
