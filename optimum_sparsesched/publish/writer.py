"""The one checkpoint writer of a compressed model, fed block by block, and the one step after every save.

What a save writes — the model's tensors with every compressed module's ``weight`` in ``export_format``
(:func:`.formats.encode.encode_module`), minus the keys transformers leaves out (``_keys_to_ignore_on_save``, tied
weights, weight conversions reverted), then ``config.json`` and ``generation_config.json`` — is produced here in
parts, so that no more than one decoder block is ever materialised, whatever the model:

- :meth:`CheckpointWriter.add_block`: one visited block's state dict, its compressed modules encoded with their
  grids (:class:`.pipeline.sources.BlockVisit`), and measured: the zero fraction of every compressed weight and
  whether it has the run's ``N:M`` pattern;
- :meth:`CheckpointWriter.finish`: every tensor outside the decoder blocks (embeddings, final norm, head; offloaded
  ones read from their weights maps), the shards' headers with the metadata the load checks
  (:func:`.formats.metadata.weights_metadata`: options, results digest, a digest of every tensor), the index,
  ``config.json`` and ``generation_config.json``. ``config.json`` and the card describe what was measured on the
  tensors written (``results.layer_sparsities``, ``results.measured``); a module whose weights differ from what the
  run recorded (edited after compression) is named in a warning.

Its three users: ``save_pretrained`` of a model in memory or with offloaded weights (:func:`write_checkpoint`: each
block visited once, resident or onloaded, then released) and the streaming path
(:mod:`optimum_sparsesched.streaming`, where each block is handed to :meth:`CheckpointWriter.add_block` right after
it is compressed). The tensors are those of the quantizer's state dict (:func:`.formats.encode.encoded_state_dict`,
what ``type(model).save_pretrained`` writes), name for name and bit for bit.

:func:`finish_folder` is the step after every save, whatever wrote the weights: ``config.json`` rewritten for
``export_format="compressed-tensors"``, and the model card (``README.md`` and its plot) unless the target folder
holds a README the user wrote.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..config import SAVED_CONFIG_KEY, SparseScheduleConfig
from ..formats.compact import REQUIRES_PLUGIN_KEY
from ..formats.encode import dense_weight, encode_state
from ..formats.metadata import DIGESTS_KEY, tensor_digest, weights_metadata
from ..pipeline.offload import offloaded_tensors
from ..pipeline.plan import CompressionPlan
from ..pipeline.sources import BlockSource, BlockVisit
from .model_card import CARD_FILE, card_for_model, is_own_card
from .shards import ShardWriter

logger = logging.getLogger(__name__)

#: the keyword arguments of ``save_pretrained`` the writer takes (transformers' others are refused, naming them)
SAVE_KWARGS = ("max_shard_size", "is_main_process", "token", "save_peft_format", "save_original_format",
               "safe_serialization")


def check_save_kwargs(args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse the ``save_pretrained`` arguments this writer does not honour (``state_dict``, ``variant``,
    ``distributed_checkpoint``, a ``save_function``, positional arguments ...), naming them."""
    unknown = sorted(set(kwargs) - set(SAVE_KWARGS)) + (["positional arguments"] if args else [])
    if unknown or kwargs.get("safe_serialization", True) is False:
        got = unknown or "safe_serialization=False"
        raise TypeError(f"save_pretrained of a compressed model takes {', '.join(SAVE_KWARGS)} (safetensors "
                        f"weights, written block by block by optimum-sparsesched); got {got}")


class CheckpointWriter:
    """One compressed checkpoint of ``model`` written into ``folder`` block by block (see the module docstring):
    :meth:`add_block` for every decoder block in order, then :meth:`finish`; :meth:`discard` after a failure."""

    def __init__(self, model: nn.Module, plan: CompressionPlan, folder: str | os.PathLike,
                 config: SparseScheduleConfig, max_shard_size: int | str = "50GB",
                 revert_conversions: bool = True) -> None:
        self.model, self.plan, self.folder, self.config = model, plan, Path(folder), config
        self.spec = config.export_spec()
        self.revert = revert_conversions
        self.shards = ShardWriter(folder, max_shard_size or "50GB", digests=(DIGESTS_KEY, tensor_digest))
        self.compact = False
        self.sparsities: dict[str, float] = {}  # measured on the weights written
        self.sizes: dict[str, int] = {}
        self.pattern_holds = config.nm is not None

    def _add(self, state: dict[str, torch.Tensor]) -> None:
        """Leave out what transformers' save leaves out (``_keys_to_ignore_on_save``, tied duplicates), revert the
        model's weight conversions (renamed or fused weights go back to the checkpoint's names), and write."""
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        for key in getattr(self.model, "_keys_to_ignore_on_save", None) or ():
            state.pop(key, None)
        state = remove_tied_weights_from_state_dict(state, self.model)
        self.shards.add(revert_weight_conversion(self.model, state) if self.revert else state)

    def add_block(self, visit: BlockVisit) -> None:
        """Block ``visit.index`` (materialised), its compressed modules encoded with ``visit.grids``."""
        prefix = self.plan.prefix(visit.index)
        state = {prefix + k: v for k, v in visit.block.state_dict().items()}
        nm = self.config.nm
        for name, module in visit.modules.items():
            w = dense_weight(module).detach()  # decoded for a module kept compact (run_compressed)
            self.sparsities[name], self.sizes[name] = float((w == 0).sum()) / w.numel(), w.numel()
            if nm is not None and self.pattern_holds:
                self.pattern_holds = bool(((w.reshape(w.shape[0], -1, nm[1]) == 0).sum(-1) >= nm[0]).all())
        self.compact = encode_state(state, visit.modules, visit.grids, self.spec) or self.compact
        self._add(state)

    def finish(self) -> list[str]:
        """The tensors outside the blocks, every shard's header and final name, the index, ``config.json`` and
        ``generation_config.json``. Returns the weight files written."""
        self._add(self._rest())
        self._record_measured()
        metadata = weights_metadata(self.spec, self.config.results.layer_sparsities, self.config.options_dict())
        files = self.shards.finish(total_parameters=self.model.num_parameters(), metadata=metadata)
        write_config(self.model, self.folder)
        return files

    def discard(self) -> None:
        self.shards.discard()

    def _record_measured(self) -> None:
        """``results`` from the tensors written: each module's zero fraction (a warning names a module whose weights
        are not what the run recorded), the overall sparsity and the pattern they really have."""
        results = self.config.results
        for name, measured in self.sparsities.items():
            recorded = results.layer_sparsities.get(name)
            if recorded is not None and abs(recorded - measured) > 1e-9:
                logger.warning("save: %s holds %.4f zeros, but the run recorded %.4f (its weights changed after "
                               "compression); config.json and the model card record what is saved", name, measured,
                               recorded)
        results.layer_sparsities = {**results.layer_sparsities, **self.sparsities}
        total = sum(self.sizes.values())
        pattern = self.config.pattern if self.pattern_holds else None
        if self.config.pattern and pattern is None:
            logger.warning("save: the weights do not all have the %s pattern the run was asked for; the model card "
                           "does not claim it", self.config.pattern)
        results.measured = {"sparsity": sum(self.sparsities[n] * self.sizes[n] for n in self.sizes) / max(total, 1),
                            "pattern": pattern}

    def _rest(self) -> dict[str, torch.Tensor]:
        """Every tensor of ``model.state_dict()`` outside the decoder blocks, offloaded ones read from their weights
        maps; with a compact block, also the empty :data:`.formats.compact.REQUIRES_PLUGIN_KEY` tensor."""
        entries, inside = offloaded_tensors(self.model), f"{self.plan.blocks_name}." if self.plan.blocks_name else ""
        state = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if key.startswith(inside) if inside else key.split(".")[0].isdigit():
                continue  # a block's tensor (a bare ModuleList of blocks names them "0.", "1.", ...)
            if value.device.type == "meta":
                owner, _, attr = key.rpartition(".")
                entry = entries[(id(self.model.get_submodule(owner) if owner else self.model), attr)]
                value = entry.hook.weights_map[entry.name]
            state[key] = value.detach()
        if self.compact:
            state[REQUIRES_PLUGIN_KEY] = torch.empty(0, dtype=torch.uint8)
        return state


def write_checkpoint(model: Any, folder: str | os.PathLike, config: SparseScheduleConfig,
                     max_shard_size: int | str = "50GB", save_original_format: bool = True) -> list[str]:
    """The weights and configs of compressed ``model`` (in memory, or with weights accelerate offloaded) into
    ``folder``: every block visited once on the CPU, encoded and written (:class:`.shards.ShardWriter`), so a save
    needs one block of memory. Returns the weight files written."""
    plan = CompressionPlan.of_compressed(model, config.results.layer_sparsities)
    writer = CheckpointWriter(model, plan, folder, config, max_shard_size, save_original_format)
    source = BlockSource(plan, grids=config.results.grids)
    try:
        for index in range(len(plan.blocks)):
            with source.visit(index, torch.device("cpu")) as visit:
                writer.add_block(visit)
        return writer.finish()
    except BaseException:
        writer.discard()
        raise


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


def finish_folder(model: Any, staging: Path, target: Path, model_name: str | None = None,
                  repo_id: str | None = None, extra_tags: Iterable[str] = ()) -> Any:
    """The step after every save into ``staging`` (to be swapped into ``target``): ``config.json`` in the export
    format's form, and the model card unless ``target`` holds a README the user wrote. Returns the card written
    (a ``huggingface_hub.ModelCard``), or ``None`` when the user's README is kept."""
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "export_format", None) == "compressed-tensors":
        rewrite_config_json(staging, model, config)
    if (target / CARD_FILE).is_file() and not is_own_card(target / CARD_FILE):
        return None
    return card_for_model(model, staging, model_name=model_name or target.name, repo_id=repo_id,
                          extra_tags=extra_tags)


def rewrite_config_json(folder: str | os.PathLike, model: nn.Module, config: SparseScheduleConfig) -> None:
    """Replace ``quantization_config`` in ``folder/config.json`` by the compressed-tensors one (ours moves to
    ``sparse_schedule_config``)."""
    from ..formats.compressed_tensors import compressed_tensors_config

    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data[SAVED_CONFIG_KEY] = data.pop("quantization_config", config.to_dict())
    data["quantization_config"] = compressed_tensors_config(model, config.export_spec(),
                                                            config.results.layer_sparsities)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
