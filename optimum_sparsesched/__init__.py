"""optimum-sparsesched: post-training SparseGPT compression with layer-wise sparsity schedules.

``import optimum_sparsesched`` registers the quantization method ``"sparse_schedule"`` with transformers, so
``AutoModelForCausalLM.from_pretrained(path, quantization_config=SparseScheduleConfig(...))`` compresses on load
and ``from_pretrained(saved_folder)`` reloads a compressed checkpoint.

The stages, from the top: :mod:`.cli` (the command line) -> :mod:`.quantizer` / :mod:`.streaming` (entry points)
-> :mod:`.publish` (the checkpoint writer, save, model card, Hub) -> :mod:`.eval` (measures) -> :mod:`.sequential`
(the block loop) -> :mod:`.config` (options, and each stage's spec) -> :mod:`.schedule` (per-layer sparsities) ->
:mod:`.formats` (checkpoint layouts) -> :mod:`.pipeline` (plan, calibration, the block visit, Hessians, residency,
resume, distributed) -> :mod:`.obs` (the OBS solve of one layer, and block reconstruction). Each imports only from
the stages after it (README, "Architecture").
"""

from pathlib import Path

from transformers.quantizers import auto as _auto
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, SparseScheduleConfig
from .eval.perplexity import perplexity
from .eval.zero_shot import zero_shot
from .formats.semi_structured import from_semi_structured, to_semi_structured
from .publish.hub import push_to_hub
from .publish.model_card import build_model_card, record_eval_result, record_zero_shot
from .quantizer import SparseScheduleQuantizer, compress
from .results import CompressionResults
from .streaming import compress_checkpoint
from .version import __version__

if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not SparseScheduleConfig:
    register_quantization_config(QUANT_METHOD)(SparseScheduleConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not SparseScheduleQuantizer:
    register_quantizer(QUANT_METHOD)(SparseScheduleQuantizer)
# ``from_pretrained(saved, quantization_config=SparseScheduleConfig(run_compressed=True))``: transformers merges the
# loading attributes (``get_loading_attributes``) of the config types it lists here into a checkpoint's own config, as
# for ``GPTQConfig`` or ``CompressedTensorsConfig``; another config passed for a quantized checkpoint is ignored
if SparseScheduleConfig not in getattr(_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", ()):
    _auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*getattr(_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", ()), SparseScheduleConfig)

#: Folder of the `evaluate` perplexity metric: ``evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)``.
PERPLEXITY_METRIC = str(Path(__file__).parent / "eval" / "metrics" / "sparse_perplexity")

__all__ = ["SparseScheduleConfig", "SparseScheduleQuantizer", "CompressionResults", "compress", "compress_checkpoint",
           "perplexity", "PERPLEXITY_METRIC", "zero_shot", "record_eval_result", "record_zero_shot",
           "build_model_card", "push_to_hub", "to_semi_structured", "from_semi_structured"]
