"""A compressed model's checkpoint written part by part: one decoder block at a time, then the rest.

What ``save_pretrained`` of a model in memory writes (the quantizer's state dict in ``export_format``, minus the
keys transformers leaves out: ``_keys_to_ignore_on_save``, tied weights, weight conversions reverted) is produced
here in parts, so that no more than one block is ever materialised:

- :func:`block_part`: one materialised block's state dict, every compressed module's ``weight`` replaced by its
  encoding (:func:`.formats.compact.compact_module_tensors` or
  :func:`.formats.compressed_tensors.compressed_tensors_module_tensors`; ``"dense"`` keeps the weight);
- :func:`rest_part`: every tensor outside the decoder blocks (embeddings, final norm, head; offloaded ones read
  from their weights maps);
- :func:`write_config`: ``config.json`` (with the ``quantization_config``) and ``generation_config.json`` as
  transformers writes them.

Two writers use them: :func:`save_offloaded` (``save_pretrained`` of a model whose blocks accelerate offloaded:
each block is onloaded, encoded, written, released) and the streaming path (:mod:`optimum_sparsesched.streaming`,
which hands each block to the writer right after compressing it). The tensors equal those of a save from memory,
name for name and bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.compact import REQUIRES_PLUGIN_KEY, compact_module_tensors
from ..formats.metadata import weights_metadata
from ..pipeline.blocks import find_decoder_blocks
from ..pipeline.offload import offloaded_tensors
from ..pipeline.sources import BlockSource
from .shards import ShardWriter


def checkpoint_metadata(config: Any) -> dict[str, str]:
    """The safetensors ``__metadata__`` of the shards, as the quantizer's ``get_state_dict_and_metadata`` gives it
    (:func:`.formats.metadata.weights_metadata` of a compressed model; call it once the results are filled)."""
    return weights_metadata(config) if config.results.compressed else {}


def encode_module(name: str, module: nn.Module, config: Any) -> dict[str, torch.Tensor] | None:
    """The tensors that replace compressed module ``name``'s ``weight`` in ``config.export_format`` (``{suffix:
    tensor}``), or None when the weight is saved as it is."""
    if config.export_format == "dense":
        return None
    if config.export_format == "compressed-tensors":
        from ..formats.compressed_tensors import compressed_tensors_module_tensors

        return compressed_tensors_module_tensors(name, module, config)
    return compact_module_tensors(module, config)


def finish_part(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Leave out what transformers' save leaves out: ``_keys_to_ignore_on_save``, tied duplicates; and revert the
    model's weight conversions (renamed or fused weights go back to the checkpoint's names)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def block_part(prefix: str, block: nn.Module, modules: dict[str, nn.Module], config: Any) -> dict[str, torch.Tensor]:
    """The saved tensors of one materialised block (``prefix``: its qualified name and a dot; ``modules``: its
    compressed modules by qualified name), before :func:`finish_part`."""
    state = {prefix + k: v for k, v in block.state_dict().items()}
    for name, module in modules.items():
        encoded = encode_module(name, module, config)
        if encoded is not None:
            del state[f"{name}.weight"]
            state.update({f"{name}.{suffix}": t for suffix, t in encoded.items()})
    return state


def rest_part(model: nn.Module, compact_stored: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.state_dict()`` outside the decoder blocks, offloaded ones read from their weights
    maps, before :func:`finish_part`; with ``compact_stored`` (a block part held compact tensors) also the empty
    :data:`.formats.compact.REQUIRES_PLUGIN_KEY` tensor, as :func:`.formats.compact.compact_state_dict` adds it."""
    blocks_name, _ = find_decoder_blocks(model)
    entries = offloaded_tensors(model)
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(f"{blocks_name}.") if blocks_name else key.split(".")[0].isdigit():
            continue  # a block's tensor (a bare ModuleList of blocks names them "0.", "1.", ...)
        if value.device.type == "meta":
            owner, _, attr = key.rpartition(".")
            entry = entries[(id(model.get_submodule(owner) if owner else model), attr)]
            value = entry.hook.weights_map[entry.name]
        state[key] = value.detach()
    if compact_stored:
        state[REQUIRES_PLUGIN_KEY] = torch.empty(0, dtype=torch.uint8)
    return state


def holds_compact_tensors(part: dict[str, torch.Tensor]) -> bool:
    """Whether a block part stores a module in the compact format."""
    return any(k.endswith(".weight_mask") for k in part)


def compressed_modules_of(model: nn.Module, prefix: str, config: Any) -> dict[str, nn.Module]:
    """The compressed modules of the block named ``prefix`` (qualified name and a dot), by qualified name."""
    return {n: model.get_submodule(n) for n in config.results.layer_sparsities if n.startswith(prefix)}


def write_config(model: Any, folder: str | os.PathLike) -> None:
    """``config.json`` and ``generation_config.json`` (and a remote-code model's files) as ``save_pretrained``
    writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


SAVE_KWARGS = ("max_shard_size", "is_main_process", "safe_serialization")


def save_offloaded(model: Any, folder: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a compressed model whose weights accelerate offloaded, into ``folder``: every block
    is onloaded once, written and released (:class:`.shards.ShardWriter`), so the save needs one block of memory.
    Takes ``max_shard_size`` (default ``"50GB"``, as transformers).

    transformers' own save of an offloaded model gathers a whole shard in memory and cannot produce this package's
    compact tensors from weights that are not loaded."""
    unknown = sorted(set(kwargs) - set(SAVE_KWARGS)) + (["positional arguments"] if args else [])
    if unknown or kwargs.get("safe_serialization", True) is False:
        raise TypeError(f"save_pretrained of an offloaded model takes {', '.join(SAVE_KWARGS)} (safetensors only); "
                        f"got {unknown or 'safe_serialization=False'}")
    config = model.config.quantization_config
    writer = ShardWriter(folder, kwargs.get("max_shard_size") or "50GB", checkpoint_metadata(config))
    try:
        blocks_name, blocks = find_decoder_blocks(model)
        source = BlockSource()
        compact_stored = False
        for index, block in enumerate(blocks):
            prefix = f"{blocks_name}.{index}." if blocks_name else f"{index}."
            with source.visit(index, block, torch.device("cpu")):
                part = block_part(prefix, block, compressed_modules_of(model, prefix, config), config)
                compact_stored = compact_stored or holds_compact_tensors(part)
                writer.add(finish_part(model, part))
        writer.add(finish_part(model, rest_part(model, compact_stored)))
        writer.finish(total_parameters=model.num_parameters())
    except BaseException:
        writer.discard()
        raise
    write_config(model, Path(folder))
