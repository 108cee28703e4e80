"""Shared fixtures: tiny random models of several families and a small byte-level BPE tokenizer, all offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

import optimum_sparsesched  # noqa: F401  (registers the quantization method)

DATA = Path(optimum_sparsesched.__file__).parent / "data"
CALIBRATION_TEXT = DATA / "calibration.txt"
VOCAB = 512
#: a small calibration for tests: 4 windows of 64 tokens of the shipped text, 2 probe windows for the schedules
SMALL = dict(dataset=str(CALIBRATION_TEXT), num_samples=4, seq_len=64, probe_samples=2)
#: the same with the uniform schedule (no statistics pass)
UNIFORM = {**SMALL, "schedule": "uniform"}


def solve(W: torch.Tensor, H, sparsity: float, kernel: str = "torch", **spec):
    """One layer's OBS solve with the options of ``PruneSpec`` as keywords -> the ``PruneResult``."""
    from optimum_sparsesched.obs.prune import prune
    from optimum_sparsesched.obs.spec import PruneSpec

    return prune(W, H, PruneSpec(sparsity, **spec), kernel=kernel)


def make_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(CALIBRATION_TEXT)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(path)
    return fast


def round_to_grid(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """``w`` ``[rows, cols]`` rounded onto GPTQ grids fitted per row and group (in place) -> ``(w, (scale, zero))``,
    as the OBS pass leaves a quantized weight."""
    from optimum_sparsesched.obs.grid import QuantGrid

    grid, step, scales, zeros = QuantGrid(bits, sym), w.shape[1] if group_size == -1 else group_size, [], []
    for c in range(0, w.shape[1], step):
        grid.find_params(w[:, c:c + step])
        scales.append(grid.scale), zeros.append(grid.zero)
        w[:, c:c + step] = grid.quantize(w[:, c:c + step])
    return w, (torch.cat(scales, 1), torch.cat(zeros, 1))


def random_compact(rows: int, cols: int, bits, group_size: int, sym: bool, seed: int, dtype, density: float):
    """A random ``[rows, cols]`` weight on ``bits``-bit grids (None: values in ``dtype``) with about ``density`` of
    it kept, as compact tensors, and the weight :func:`.compact.decode_weight` rebuilds from them."""
    from optimum_sparsesched.formats.compact import decode_weight, encode_weight

    g = torch.Generator().manual_seed(seed)
    w, grid = torch.randn(rows, cols, generator=g), None
    if bits is not None:
        w, grid = round_to_grid(w, bits, group_size, sym)
    w[torch.rand(rows, cols, generator=g) >= density] = 0
    tensors = encode_weight(w.to(dtype), grid, bits, group_size, sym)
    return tensors, decode_weight(tensors, (rows, cols), dtype, bits, group_size, sym)[0]


def load_run_compressed(folder, run_compressed=True, **kwargs):
    """``from_pretrained(folder, quantization_config=SparseScheduleConfig(run_compressed=...), **kwargs)``, without
    transformers' note that only the loading attributes of the passed config are used."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=optimum_sparsesched.SparseScheduleConfig(run_compressed=run_compressed),
            **kwargs)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_config(family: str, **overrides):
    """A 2-4 block random config of ``family`` small enough for CPU tests (hidden 64, inputs multiples of 8)."""
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       **common)
    elif family == "opt":
        cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                     word_embed_proj_dim=64, max_position_embeddings=512, **common)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    elif family == "bloom":
        cfg = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                                            max_position_embeddings=512, **common)
    else:
        raise KeyError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["llama", "opt", "gpt2", "bloom", "gemma3", "qwen2"]


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    return model.eval()


def block_visit(model, inputs=None, index: int = 0, device: str = "cpu"):
    """The visit (a context manager yielding a ``BlockVisit``) of block ``index`` of ``model`` with every compressible
    module, on ``device``; ``inputs``: the captured block arguments."""
    from optimum_sparsesched.pipeline.plan import PlanSpec, plan_compression
    from optimum_sparsesched.pipeline.sources import BlockSource

    return BlockSource(plan_compression(model, PlanSpec(skip=(), seq_len=1)), inputs).visit(index, device)


@pytest.fixture
def save_tiny(tmp_path, tokenizer):
    """Save a tiny random model (and the tokenizer) as a checkpoint folder; returns its path."""

    def save(family: str, seed: int = 0, **overrides) -> Path:
        path = tmp_path / f"{family}-{seed}"
        tiny_model(family, seed, **overrides).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save


def write_random_checkpoint(path: Path, config, dtype=torch.bfloat16, max_shard_bytes: int = 2**30, seed: int = 0,
                            std: float = 0.02) -> int:
    """Write a checkpoint of ``config`` with random weights (normal, ``std``; norms 1) into ``path`` shard by shard,
    never holding more than one shard in memory, as ``save_pretrained`` names the files. Returns the weight bytes."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = skeleton.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map, total = {}, 0
    for file, keys in zip(names, shards):
        tensors = {}
        for k in keys:
            t = state[k]
            if "norm" in k and k.endswith(".weight"):
                tensors[k] = torch.ones(t.shape, dtype=t.dtype)
            else:
                tensors[k] = (torch.randn(t.shape, generator=generator) * std).to(t.dtype)
            total += tensors[k].numel() * tensors[k].element_size()
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = dtype
    config.save_pretrained(path)
    return total
