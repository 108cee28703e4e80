"""optimum-sparsesched: post-training SparseGPT compression with layer-wise sparsity schedules.

``import optimum_sparsesched`` registers the quantization method ``"sparse_schedule"`` with transformers, so
``AutoModelForCausalLM.from_pretrained(path, quantization_config=SparseScheduleConfig(...))`` compresses on load
and ``from_pretrained(saved_folder)`` reloads a compressed checkpoint.
"""

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, SparseScheduleConfig
from .quantizer import SparseScheduleQuantizer

if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not SparseScheduleConfig:
    register_quantization_config(QUANT_METHOD)(SparseScheduleConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not SparseScheduleQuantizer:
    register_quantizer(QUANT_METHOD)(SparseScheduleQuantizer)

from .sequential import compress  # noqa: E402
from .perplexity import perplexity  # noqa: E402
from .semi_structured import from_semi_structured, to_semi_structured  # noqa: E402
from .model_card import build_model_card, record_eval_result  # noqa: E402
from .hub import push_to_hub  # noqa: E402

#: Folder of the `evaluate` perplexity metric: ``evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)``.
PERPLEXITY_METRIC = str(__import__("pathlib").Path(__file__).parent / "metrics" / "sparse_perplexity")

__all__ = ["SparseScheduleConfig", "SparseScheduleQuantizer", "compress", "perplexity", "PERPLEXITY_METRIC",
           "record_eval_result", "build_model_card", "push_to_hub",
           "to_semi_structured", "from_semi_structured"]
__version__ = "0.1.0"
