"""`SparseScheduleQuantizer`: the transformers glue that runs the compression inside ``from_pretrained``, and
:func:`compress`, the same for a model already in memory.

Load phases (transformers ``HfQuantizer``; what the base class does is not repeated here):
- ``update_device_map``: with no ``device_map`` the model loads on the CPU; compression moves one decoder block
  at a time to the GPU (when there is one), so models larger than the GPU can be compressed. A user's
  ``device_map`` is kept: blocks it offloads to ``"cpu"``/``"disk"`` (with ``offload_folder``) are onloaded one at
  a time and their compressed weights written back to the offload store (:mod:`.pipeline.sources`), so models
  larger than the host memory can be compressed too.
- ``_process_model_before_weight_loading``: for a model to compress, before any tensor is read, the model must be a
  causal LM with its head and every safetensors file's header must match its size (:mod:`.pipeline.source_check`,
  :mod:`.pipeline.checkpoint_files`); for pre-quantized checkpoints the options and
  results of ``config.json`` are checked against what every weight file recorded (:mod:`.formats.metadata`), and the
  key that makes plain transformers refuse a compact checkpoint is marked as expected.
- load operations (``get_load_operations``): a compact checkpoint (:mod:`.formats.compact`) stores each compressed
  weight as ``weight_mask`` + values or packed codes and grid; :class:`.formats.compact_load.CompactDeserialize`
  checks and rebuilds the dense weight bit for bit while the checkpoint loads, its grid into ``grids``.
- ``run_compressed=True`` (a loading attribute, :mod:`.formats.run_compressed`): compactly stored Linears become
  :class:`.formats.compressed_linear.CompressedLinear` before loading, the load operation checks their tensors and
  keeps them as stored; ``model.dequantize()`` decodes them into dense Linears.
- ``_process_model_after_weight_loading``: for a model that is not yet compressed, check the source
  (:func:`.pipeline.source_check.check_source`: every tensor read from the checkpoint, every weight finite), then
  calibrate and compress it (:func:`.sequential.compress_blocks`); for a loaded checkpoint, every compressed module
  must have come from it; then give the model this package's save (:mod:`.publish.save`).
- saving (``get_state_dict_and_metadata``, what a plain ``type(model).save_pretrained`` uses; the model's own
  ``save_pretrained`` is this package's block-by-block writer, :mod:`.publish.save`): the state dict with every
  compressed module encoded in ``export_format`` (:func:`.formats.encode.encoded_state_dict`); every weight file's
  header records the writer, the format, the grid and the results (:func:`.formats.metadata.weights_metadata`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer

from .config import SparseScheduleConfig
from .formats.compact import REQUIRES_PLUGIN_KEY, SUFFIXES
from .formats.compact_load import CompactDeserialize, check_all_loaded
from .formats.encode import encoded_state_dict
from .formats.metadata import check_weights_metadata, weights_metadata
from .formats.run_compressed import (check_int4_kernel, check_sparse_kernel, compressed_linears, dequantize_model,
                                     encode_dense_modules, replace_compact_modules, use_int4_kernels,
                                     use_sparse_kernels)
from .formats.spec import ExportSpec
from .pipeline.checkpoint_files import check_shapes, check_weight_files
from .pipeline.offload import has_offloaded_weights
from .pipeline.source_check import check_causal_lm_config, check_causal_lm_model, check_source
from .publish.save import install_save
from .sequential import compress_blocks


class SparseScheduleQuantizer(HfQuantizer):
    """Compress-on-load with SparseGPT and a layer-wise sparsity schedule."""

    requires_calibration = False
    quantization_config: SparseScheduleConfig

    @property
    def export_spec(self) -> ExportSpec:
        """How the compressed weights are (to be) stored: the config's ``export_format`` and grid."""
        return self.quantization_config.export_spec()

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:  # compressing on load: a loading option is refused before any work
            self.quantization_config.check_compression_options()

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        if device_map is None and not self.pre_quantized:
            device_map = {"": torch.device("cpu")}
        return device_map

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:  # a source to compress: refused now, before any tensor is read
            check_causal_lm_config(model.config)
            check_causal_lm_model(model)
            check_shapes(check_weight_files([f for f in checkpoint_files or () if str(f).endswith(".safetensors")]),
                         model)  # the model is still weightless: its shapes are config.json's
        if self.pre_quantized:
            config = self.quantization_config
            check_weights_metadata(checkpoint_files or (), config.export_spec(), config.results.layer_sparsities,
                                   config.options_dict())
            loading = getattr(model.config, "quantization_config", None)
            if isinstance(loading, SparseScheduleConfig):  # the load operations write the decoded grids there; the
                loading.results.grids = config.results.grids  # model keeps this quantizer's config: share one dict
            ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignored | {re.escape(REQUIRES_PLUGIN_KEY)}
            if config.run_compressed == "int4":
                check_int4_kernel(config.bits)
            if config.run_compressed == "sparse":
                check_sparse_kernel()
            if config.run_compressed:
                replace_compact_modules(model, checkpoint_files or (), config.export_spec(),
                                        config.results.layer_sparsities)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            check_source(model)
            compress_blocks(model, self.quantization_config)
        else:
            config = self.quantization_config
            check_all_loaded(model, config.results.layer_sparsities)
            if config.run_compressed:
                encode_dense_modules(model, config.export_spec(), config.results.layer_sparsities,
                                     config.results.grids)
            if config.run_compressed == "int4":
                use_int4_kernels(model)
            if config.run_compressed == "sparse":
                use_sparse_kernels(model)
        install_save(model, source=None if self.pre_quantized else getattr(model, "name_or_path", None))
        return model

    # a compressed weight is stored under these names (the compact format) or as a plain dense ``weight``
    serialized_names = {"weight": ["weight", *SUFFIXES]}

    def get_load_operations(self) -> dict[str, Any]:
        return {"deserialize": CompactDeserialize}

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        config = self.quantization_config
        if not config.results.compressed:
            return None, {}
        if has_offloaded_weights(model):
            raise ValueError("save_pretrained: the weights of this compressed model are offloaded by accelerate; save "
                             "it with model.save_pretrained(folder), this package's save, which writes it block by "
                             "block (type(model).save_pretrained cannot encode weights that are not loaded)")
        spec = config.export_spec()
        metadata = weights_metadata(spec, config.results.layer_sparsities, config.options_dict())
        if spec.format == "dense" and not compressed_linears(model):
            return None, metadata
        return encoded_state_dict(model, spec, config.results.layer_sparsities, config.results.grids), metadata

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every Linear kept compact becomes a dense one (decoded)."""
        return dequantize_model(model)

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def compress(model: nn.Module, config: SparseScheduleConfig | dict[str, Any], tokenizer: Any = None) -> nn.Module:
    """Compress a model already in memory in place, as ``from_pretrained(..., quantization_config=config)`` would:
    afterwards it saves, reloads and publishes like a model compressed on load. Returns ``model``."""
    if isinstance(config, dict):
        config = SparseScheduleConfig(**config)
    config.check_compression_options()
    check_source(model)
    compress_blocks(model, config, tokenizer)
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = SparseScheduleQuantizer(config, pre_quantized=True)
    install_save(model, source=getattr(model, "name_or_path", None))
    return model
