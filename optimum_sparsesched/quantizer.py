"""`SparseScheduleQuantizer`: the transformers glue that runs :func:`compress` inside ``from_pretrained``.

Load phases (transformers ``HfQuantizer``):
- ``update_device_map``: with no ``device_map`` the model loads on the CPU; compression moves one decoder block
  at a time to the GPU (when there is one), so models larger than the GPU can be compressed.
- ``_process_model_before_weight_loading``: nothing to replace — a compressed model keeps dense ``nn.Linear``.
- load operations (``get_load_operations``): a compact checkpoint (:mod:`.compact`) stores each compressed weight as
  ``weight_mask`` + values or packed codes and grid; :class:`.compact.CompactDeserialize` rebuilds the dense weight
  bit for bit while the checkpoint loads.
- ``_process_model_after_weight_loading``: for a model that is not yet compressed, calibrate and compress it now;
  for a checkpoint that already is (``pre_quantized``), nothing more.
- saving (``get_state_dict_and_metadata``): the compact tensors, the compressed-tensors ``pack-quantized`` ones
  (:mod:`.compressed_tensors_export`), or the dense state dict for ``export_format="dense"``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer

from .compact import SUFFIXES, CompactDeserialize, compact_state_dict
from .config import SparseScheduleConfig
from .serialization import install_atomic_save


class SparseScheduleQuantizer(HfQuantizer):
    """Compress-on-load with SparseGPT and a layer-wise sparsity schedule."""

    requires_calibration = False
    quantization_config: SparseScheduleConfig

    def __init__(self, quantization_config: SparseScheduleConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        if device_map is None and not self.pre_quantized:
            device_map = {"": torch.device("cpu")}
        return device_map

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized:
            from .sequential import compress

            compress(model, self.quantization_config)
        else:
            install_atomic_save(model)
        return model

    # a compressed weight is stored under these names (the compact format) or as a plain dense ``weight``
    serialized_names = {"weight": ["weight", *SUFFIXES]}

    def get_load_operations(self) -> dict[str, Any]:
        return {"deserialize": CompactDeserialize}

    def get_state_dict_and_metadata(self, model) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        config = self.quantization_config
        if not config.layer_sparsities or config.export_format == "dense":
            return None, {}
        if config.export_format == "compressed-tensors":
            from .compressed_tensors_export import compressed_tensors_state_dict

            return compressed_tensors_state_dict(model, config), {}
        return compact_state_dict(model, config), {"sparse_schedule_format": "compact"}

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
