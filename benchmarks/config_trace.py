"""Follow the run's ``SparseScheduleConfig`` through the calls of one compression: how far into the package the whole
config travels (a measure of how well the stages are separated by typed specs).

    python benchmarks/config_trace.py [--entry compress|stream|both] [--json OUT]

A tiny random Llama (3 blocks) is compressed in process with the default options on the shipped calibration text,
through ``optimum_sparsesched.compress`` (in memory) and through ``compress_checkpoint`` (streamed), under
``sys.setprofile``. Counted, for each entry point:

- **stops**: distinct package functions called with the config object itself among their arguments (the config's
  own methods, in ``config.py``, are not counted: they are the config);
- **moves**: distinct caller -> callee pairs of such functions that cross from one module to another;
- **returns up**: the moves whose callee sits in a stage above the caller's (the stage order of the README's
  architecture section, ``tests/test_layout.py``): calls back up the layers, through a callback or an argument.

The stage order is written out here for the module names of this version and of the one before the refactoring of
issue 21 (``cli_inputs``, ``default_model``, ``pipeline.reconstruct`` ...), so the same script measures both trees
(run it with ``PYTHONPATH`` pointing at the other tree).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

#: module (first component after the package, or a dotted prefix) -> layer index, top first
LAYER_OF = {"cli": 0, "cli_inputs": 0, "cli_options": 0, "default_model": 0, "pinned_download": 0,
            "__init__": 1, "quantizer": 1, "streaming": 1, "publish": 2, "eval": 3, "sequential": 4, "config": 5,
            "config_checks": 5, "results": 5, "schedule": 6, "formats": 7, "pipeline": 8, "obs": 9, "version": 10}


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYER_OF.get(key, 99)


def trace(entry: str) -> dict:
    """Compress a tiny Llama through ``entry`` and return the counts (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    import optimum_sparsesched as osp

    data = Path(osp.__file__).parent / "data" / "calibration.txt"
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    config = osp.SparseScheduleConfig(sparsity=0.5, dataset=str(data), num_samples=2, seq_len=32, probe_samples=1)
    stops: set[tuple[str, str]] = set()
    edges: set[tuple[tuple[str, str], tuple[str, str]]] = set()

    def holds_config(frame) -> bool:
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        return any(frame.f_locals.get(n) is config for n in names)

    def fn(frame) -> tuple[str, str] | None:
        module = frame.f_globals.get("__name__", "")
        own = module == "optimum_sparsesched.config"  # the config's own methods
        return (module, frame.f_code.co_qualname) if module.startswith("optimum_sparsesched") and not own else None

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = fn(frame)
        if callee is None or not holds_config(frame):
            return
        stops.add(callee)
        caller = frame.f_back
        while caller is not None and (fn(caller) is None or not holds_config(caller)):
            caller = caller.f_back  # the nearest enclosing package function that holds the config
        if caller is not None:
            edges.add((fn(caller), callee))

    with tempfile.TemporaryDirectory() as tmp:
        if entry == "stream":
            model.save_pretrained(Path(tmp) / "src")
            tokenizer.save_pretrained(Path(tmp) / "src")
        sys.setprofile(profile)
        try:
            if entry == "stream":
                osp.compress_checkpoint(Path(tmp) / "src", Path(tmp) / "out", config, tokenizer=tokenizer)
            else:
                osp.compress(model, config, tokenizer=tokenizer)
        finally:
            sys.setprofile(None)
    moves = [(a, b) for a, b in edges if a[0] != b[0]]
    up = [(a, b) for a, b in moves if layer(b[0]) < layer(a[0])]
    return {"stops": len(stops), "moves": len(moves), "returns_up": len(up),
            "functions": sorted(f"{m}:{q}" for m, q in stops),
            "returns_up_calls": sorted(f"{a[0]}:{a[1]} -> {b[0]}:{b[1]}" for a, b in up)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", default="both", choices=["compress", "stream", "both"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result = {e: trace(e) for e in (["compress", "stream"] if a.entry == "both" else [a.entry])}
    for e, r in result.items():
        print(f"{e}: {r['stops']} stops, {r['moves']} moves between modules, {r['returns_up']} returns up the layers")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
