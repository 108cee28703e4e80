"""Checkpoint to checkpoint with one decoder block in memory: :func:`compress_checkpoint`.

``compress_checkpoint(src, out, config)`` compresses a safetensors checkpoint (a local folder or a hub model id)
into ``out`` without ever holding the model in memory:

1. the model is built by transformers from ``src`` with a ``device_map`` that keeps everything outside the decoder
   blocks (embeddings, final norm, rotary tables, head: the only resident parts) in CPU memory and offloads every
   block to ``"disk"``; transformers' disk offload then points accelerate's weights map straight at the
   checkpoint's own shards, so a block's tensors are read lazily (safetensors ``safe_open``) when it is visited,
   and ``src`` is never written;
2. the block loop (:func:`.sequential.compress_blocks`) visits one block at a time (:mod:`.pipeline.sources`):
   calibration capture, the schedule's measurement pass, then per block Hessians → OBS; each compressed block's
   visit is handed to the checkpoint writer (:meth:`.publish.writer.CheckpointWriter.add_block`, the writer every
   save uses), which encodes it in ``export_format`` and appends it to the output shards, then released;
3. the tensors outside the blocks, the shard index, ``config.json`` (with the ``quantization_config`` and its
   results) and ``generation_config.json`` are written at the end (:meth:`.publish.writer.CheckpointWriter.finish`),
   then the tokenizer and the after-save step of every save (:func:`.publish.writer.finish_folder`: the model
   card).

Everything is written into a private staging folder inside ``out`` and moved into ``out`` only when complete, with
the guarantees of every save of this package (:func:`.publish.staging.staged_folder`: one writer per folder, files
renamed in one by one with ``config.json`` last, stale weight files of an earlier save of ours removed and nothing
else, every weight file recording the options and the results digest that the load checks); a failure at any point
leaves ``out`` as it was (a folder created for the run is removed again). ``out`` may not overlap the run's
``checkpoint_dir``.

The result equals ``from_pretrained(src, quantization_config=config).save_pretrained(out)`` tensor for tensor,
bit for bit, with the same ``dtype``. Under torch.distributed every rank streams the blocks and shares the work as
usual (:mod:`.pipeline.distributed`); rank 0 writes.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import SparseScheduleConfig
from .logs import quiet
from .pipeline.blocks import find_decoder_blocks, non_block_modules
from .pipeline.calibration import resolve_tokenizer
from .pipeline.checkpoint_files import check_against_config, check_checkpoint_folder, read_config_file
from .pipeline.distributed import init_distributed
from .pipeline.plan import plan_compression
from .pipeline.source_check import check_causal_lm_config, check_source
from .publish.save import check_folders_apart
from .publish.shards import shard_size_bytes
from .publish.staging import check_overwrite, staged_folder
from .publish.writer import CheckpointWriter, finish_folder
from .sequential import compress_blocks

#: what a hub snapshot needs: the config, the safetensors weights and the tokenizer files
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_source(src: str | os.PathLike, revision: str | None = None, token: str | bool | None = None) -> Path:
    """``src`` as a local folder: itself, or a hub model id downloaded with ``huggingface_hub.snapshot_download``
    (config, safetensors weights and tokenizer files only). Checks it holds safetensors weights."""
    path = Path(src)
    if not path.is_dir():
        if path.exists():
            raise ValueError(f"src: {str(src)!r} is a file; allowed: a checkpoint folder or a hub model id")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(src), revision=revision, token=token, allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # offline, unknown repo, invalid id: one message naming the parameter
            raise ValueError(f"src: {str(src)!r} is neither a local folder nor a hub model id that could be "
                             f"downloaded ({type(exc).__name__}: {exc})") from exc
    if not (path / "config.json").is_file():
        raise ValueError(f"src: {str(path)!r} has no config.json; allowed: a transformers checkpoint folder")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise ValueError(f"src: {str(path)!r} has no safetensors weights (model.safetensors or "
                         "model.safetensors.index.json); streaming reads safetensors shards: convert the checkpoint "
                         "with from_pretrained(...).save_pretrained(...) first")
    with as_src():
        config = read_config_file(path)
        check_causal_lm_config(config)  # config.json, the architecture
        tensors = check_checkpoint_folder(path)  # the index, every shard present, every header against its size
        check_against_config(config, tensors)  # every tensor of the shape config.json describes
    return path


@contextmanager
def as_src() -> Iterator[None]:
    """A source check's ``ValueError`` names the argument ``src`` (the checks say ``model:``)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError("src: " + str(exc).removeprefix("model: ")) from None


def streaming_device_map(folder: Path) -> dict[str, str]:
    """Every decoder block on ``"disk"`` (read from the checkpoint's shards), every other module on ``"cpu"``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    blocks_name, blocks = find_decoder_blocks(skeleton)
    names = {id(m): n for n, m in skeleton.named_modules()}
    device_map = {names[id(m)]: "cpu" for m in non_block_modules(skeleton, {id(b) for b in blocks})}
    device_map.update({f"{blocks_name}.{i}" if blocks_name else str(i): "disk" for i in range(len(blocks))})
    return device_map


def _check_output(out: Path, src: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file; allowed: a folder (created if missing)")
    check_overwrite(out, overwrite, source=src, what="out")  # a model that is not ours, or the source itself


def compress_checkpoint(src: str | os.PathLike, out: str | os.PathLike,
                        config: SparseScheduleConfig | dict[str, Any], tokenizer: Any = None, *,
                        dtype: str | torch.dtype = "auto", max_shard_size: int | str = "50GB",
                        revision: str | None = None, token: str | bool | None = None,
                        overwrite: bool = False) -> SparseScheduleConfig:
    """Compress the safetensors checkpoint ``src`` (folder or hub model id) into the folder ``out`` with one decoder
    block in memory at a time (see the module docstring). ``dtype``: the compute and saved dtype (``"auto"``: the
    checkpoint's, as ``from_pretrained``); ``max_shard_size``: of the output shards (any size costs no memory);
    ``revision``/``token``: for a hub id; ``overwrite=True``: replace a model this package did not write in ``out``
    (or the source folder itself: the output is renamed in only after the last read of the source). Returns
    ``config`` with its results filled (also saved in ``out/config.json``). Every check of the arguments and of the
    source runs before any work."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, dict):
        config = SparseScheduleConfig(**config)
    if not isinstance(config, SparseScheduleConfig):
        raise ValueError(f"config: a {type(config).__name__} is not valid; allowed: a SparseScheduleConfig or a dict")
    config.check_compression_options()
    shard_size_bytes(max_shard_size)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite: {overwrite!r} is not valid; allowed: True or False")
    out = Path(out)
    folder = resolve_source(src, revision, token)
    _check_output(out, folder, overwrite)
    check_folders_apart(config.checkpoint_dir, out)
    ctx = init_distributed()
    with tempfile.TemporaryDirectory(prefix="sparsesched-offload-") as scratch:  # for weights transformers converts
        with quiet("accelerate.big_modeling"):  # "parameters on the meta device": that is the point here
            model = AutoModelForCausalLM.from_pretrained(folder, device_map=streaming_device_map(folder),
                                                         offload_folder=scratch, dtype=dtype)
        model.eval()
        with as_src():
            check_source(model)  # every tensor in the checkpoint, every weight finite: before any work
        tok = resolve_tokenizer(config.tokenizer, tokenizer, model)
        if not Path(src).is_dir():  # a hub id: name the model as from_pretrained(src) would (the card's base_model)
            model.config._name_or_path = model.name_or_path = str(src)
        if not ctx.is_main:  # rank 0 writes; the other ranks compress their share and discard the blocks
            compress_blocks(model, config, tok, sink=lambda *_: None)
            ctx.barrier()
            return config
        created = not out.exists()
        try:
            with staged_folder(out, overwrite, source=folder, what="out") as staging:
                _stream_into(model, config, tok, staging, out, max_shard_size)
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a folder made for this run only
            raise
    ctx.barrier()
    return config


def _stream_into(model: Any, config: SparseScheduleConfig, tok: Any, staging: Path, out: Path,
                 max_shard_size: int | str) -> None:
    """Compress ``model`` block by block into shards in ``staging``, then write the rest beside them."""
    writer = CheckpointWriter(model, plan_compression(model, config.plan_spec()), staging, config, max_shard_size)
    try:
        compress_blocks(model, config, tok, sink=writer.add_block)
        writer.finish()
    except BaseException:
        writer.discard()
        raise
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(staging)
    finish_folder(model, staging, out)
