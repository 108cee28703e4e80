#!/usr/bin/env python3
"""``preset="sparsegpt"`` against the reference SparseGPT (IST-DASLab/sparsegpt), side by side in one process.

The reference is imported from a checkout given on the command line (``fetch github:IST-DASLab/sparsegpt``, or
``git clone https://github.com/IST-DASLab/sparsegpt``); none of its code is copied here. Its ``SparseGPT`` class
(``sparsegpt.py``: Hessian accumulation and ``fasterprune``) and ``find_layers`` (``modelutils.py``) are driven by
the block loop of its ``llama.py`` (``llama_sequential``: Hessians of every Linear of a block from one forward of all
windows, each Linear pruned, then the pruned block's outputs feed the next), written here for transformers 5: the
block arguments (rotary tables, masks) are the ones the model passes, recorded by our block capture.

Both sides see the same calibration windows (16×512 random windows of wikitext2-valid, seed 0: the reduced-512
protocol) and the model in float32 on the CPU. Reported:

1. layer 0: every Linear solved by the reference's ``fasterprune`` and by our ``prune`` (torch scan; with
   ``--triton`` also the Triton scan, under ``TRITON_INTERPRET=1`` on a CPU) from the reference's own Hessian:
   fraction of mask entries that differ, largest weight difference, both layer losses; and how far our Hessian
   capture (:class:`optimum_sparsesched.pipeline.hessians.HessianAccumulator`) is from the reference's;
2. the whole model: perplexity of the reference's result and of ours on WikiText-2 test and on Shakespeare
   (first 16 windows of 512 tokens each), and the CPU seconds (user+sys, all threads) of each compression.

    python benchmarks/reference_sparsegpt.py REF_CHECKOUT MODEL_DIR [--pattern 2:4 | --sparsity 0.5]
        [--sides reference ours] [--layer0-only] [--triton] [--device cuda] [--kernels auto torch triton]
        [--out benchmarks/results/reference/2of4.json]

On a GPU (``--device cuda``, the default there) ``--triton`` compares the compiled Triton scan on block 0 and
``--kernels torch triton`` gives one whole-model row per scan.

``--sides ours`` with ``PYTHONPATH=<an older worktree>`` measures an older commit of the package alone (bisecting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_FILE, wikitext_calibration_text, write_result  # noqa: E402

SHAKESPEARE = Path(__file__).parent / "data" / "shakespeare.txt"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # --device


def import_reference(checkout: str):
    """The reference's ``sparsegpt`` and ``modelutils`` modules, imported from ``checkout``."""
    if not (Path(checkout) / "sparsegpt.py").is_file():
        raise SystemExit(f"REF_CHECKOUT: {checkout} has no sparsegpt.py (a checkout of IST-DASLab/sparsegpt)")
    sys.path.insert(0, str(Path(checkout).resolve()))
    if not torch.cuda.is_available():  # fasterprune times itself with torch.cuda.synchronize(): a no-op on a CPU
        torch.cuda.synchronize = lambda *a, **k: None
    import modelutils
    import sparsegpt
    return sparsegpt, modelutils


def evaluate(model, tokenizer, windows: int = 16, seq_len: int = 512) -> dict[str, float]:
    import optimum_sparsesched as osp

    texts = {"wikitext2": EVAL_FILE, "shakespeare": [SHAKESPEARE.read_text(encoding="utf-8")]}
    return {k: osp.perplexity(model, tokenizer, t, seq_len, windows) for k, t in texts.items()}


def cpu_seconds() -> float:
    return time.process_time()


@torch.no_grad()
def reference_sequential(model, windows, ref, modelutils, sparsity: float, nm: tuple[int, int] | None,
                         layer0: dict | None = None, quiet: bool = True) -> None:
    """The reference's ``llama_sequential`` (not true-sequential, blocksize 128, percdamp 0.01) over the blocks
    of ``model``; ``layer0`` (a dict) receives block 0's Hessians and dense weights before they are pruned."""
    import contextlib
    import io

    from optimum_sparsesched.pipeline.blocks import capture_block_inputs, run_block

    inputs = capture_block_inputs(model, windows, DEVICE, DEVICE)
    layers = model.model.layers
    prunen, prunem = nm or (0, 0)
    for i, layer in enumerate(layers):
        full = modelutils.find_layers(layer)
        gpts = {name: ref.SparseGPT(m) for name, m in full.items()}

        def add_batch(name):
            def hook(_, inp, out):
                gpts[name].add_batch(inp[0].data, out.data)
            return hook

        handles = [m.register_forward_hook(add_batch(name)) for name, m in full.items()]
        for h in inputs.hidden:
            run_block(layer, h, inputs.args[i], inputs.kwargs[i], DEVICE, inputs.returns_tuple)
        for h in handles:
            h.remove()
        if i == 0 and layer0 is not None:
            layer0.update({name: (g.H.clone(), g.nsamples, full[name].weight.detach().clone())
                           for name, g in gpts.items()})
        for name, g in gpts.items():
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                g.fasterprune(sparsity, prunen=prunen, prunem=prunem, blocksize=128, percdamp=0.01)
            g.free()
        inputs.hidden = [run_block(layer, h, inputs.args[i], inputs.kwargs[i], DEVICE, inputs.returns_tuple)
                         for h in inputs.hidden]


def reference_layer_solve(ref, weight: torch.Tensor, H: torch.Tensor, nsamples: int, sparsity: float,
                          nm: tuple[int, int] | None) -> torch.Tensor:
    """The reference's ``fasterprune`` of one Linear ``weight`` from the Hessian ``H`` -> the pruned weight."""
    import contextlib
    import io

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    layer.weight.data = weight.clone()
    g = ref.SparseGPT(layer)
    g.H, g.nsamples = H.clone(), nsamples
    with contextlib.redirect_stdout(io.StringIO()):
        g.fasterprune(sparsity, prunen=nm[0] if nm else 0, prunem=nm[1] if nm else 0, blocksize=128, percdamp=0.01)
    return layer.weight.data


def layer_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``½ tr((W − Q) H (W − Q)ᵀ)`` (the undamped layer loss; scale of ``H`` as given)."""
    D = (W - Q).double()
    return float(0.5 * torch.einsum("ij,jk,ik->", D, H.double(), D))


def compare_layer0(ref, layer0: dict, windows, model_path: str, sparsity: float, nm, triton: bool) -> dict:
    """Our scan against the reference's ``fasterprune`` on each Linear of block 0 from the reference's Hessian."""
    from optimum_sparsesched.obs.prune import prune
    from optimum_sparsesched.obs.spec import PruneSpec

    rows = {}
    spec = PruneSpec(sparsity, nm=nm, block_size=128, damp=0.01)
    for name, (H, nsamples, W) in layer0.items():
        theirs = reference_layer_solve(ref, W, H, nsamples, sparsity, nm)
        row = {"shape": list(W.shape), "reference_zeros": float((theirs == 0).float().mean()),
               "reference_loss": layer_loss(W, theirs, H)}
        for kernel in ["torch"] + (["triton"] if triton else []):
            ours = prune(W, H, spec, kernel=kernel).weight.to(theirs.device)
            differ = ((ours == 0) != (theirs == 0))
            row[kernel] = {"mask_entries_differ": float(differ.float().mean()),
                           "rows_with_a_different_mask": int(differ.any(1).sum()),
                           "max_weight_diff": float((ours - theirs).abs().max()),
                           "zeros": float((ours == 0).float().mean()), "loss": layer_loss(W, ours, H)}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    return rows


def hessian_capture_gap(layer0: dict, model, windows) -> dict:
    """Relative Frobenius gap between our Hessian capture and the reference's, per distinct input of block 0 (both
    normalised to ``2 X Xᵀ / tokens``)."""
    from optimum_sparsesched.pipeline.blocks import capture_block_inputs
    from optimum_sparsesched.pipeline.hessians import collect_block_hessians
    from optimum_sparsesched.pipeline.plan import plan_compression
    from optimum_sparsesched.pipeline.sources import BlockSource

    import optimum_sparsesched as osp

    plan = plan_compression(model, osp.SparseScheduleConfig(sparsity=0.5, schedule="uniform").plan_spec())
    inputs = capture_block_inputs(model, windows, DEVICE, DEVICE)
    with BlockSource(plan, inputs).visit(0, DEVICE) as visit:
        accs = collect_block_hessians(visit, inputs.hidden)
    tokens = windows.numel()
    gaps = {}
    for full_name, acc in accs.items():
        name = full_name.split("layers.0.", 1)[-1]
        H, nsamples, _ = layer0[name]
        H_ref = H.to(acc.H.device) * nsamples / tokens
        gaps[name] = float(torch.linalg.norm(acc.H - H_ref) / torch.linalg.norm(H_ref))
    return gaps


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="a checkout of IST-DASLab/sparsegpt")
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (then sparsity = N/M)")
    ap.add_argument("--sides", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    ap.add_argument("--layer0-only", action="store_true", help="only the block-0 comparison")
    ap.add_argument("--triton", action="store_true", help="also the Triton scan in the block-0 comparison "
                                                           "(set TRITON_INTERPRET=1 on a CPU)")
    ap.add_argument("--device", default=str(DEVICE), help="where both sides compute (default: cuda if available)")
    ap.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                    help="our OBS scan(s) for the whole-model rows (OPTIMUM_SPARSESCHED_OBS_KERNEL)")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp
    from optimum_sparsesched.pipeline.calibration import calibration_windows

    DEVICE = torch.device(args.device)
    torch.set_grad_enabled(False)
    nm = tuple(int(x) for x in args.pattern.split(":")) if args.pattern else None
    sparsity = nm[0] / nm[1] if nm else args.sparsity
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = wikitext_calibration_text()
    windows = calibration_windows(calibration, tokenizer, args.num_samples, args.seq_len, 0)
    result = {"sparsity": sparsity, "pattern": args.pattern, "threads": torch.get_num_threads(),
              "device": str(DEVICE), "osp_file": osp.__file__}

    if "reference" in args.sides:
        ref, modelutils = import_reference(args.reference)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(DEVICE)
        layer0: dict = {}
        c0 = cpu_seconds()
        if args.layer0_only:
            reference_sequential_layer0(model, windows, ref, modelutils, layer0)
        else:
            reference_sequential(model, windows, ref, modelutils, sparsity, nm, layer0)
            result["reference"] = {"compress_cpu_s": cpu_seconds() - c0, "ppl": evaluate(model, tokenizer)}
            print("reference", json.dumps(result["reference"]), flush=True)
        del model
        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(DEVICE)
        result["hessian_gap"] = hessian_capture_gap(layer0, dense, windows)
        print("hessian gap", json.dumps(result["hessian_gap"]), flush=True)
        del dense
        result["layer0"] = compare_layer0(ref, layer0, windows, args.model, sparsity, nm, args.triton)

    if "ours" in args.sides and not args.layer0_only:
        options = dict(sparsity=sparsity, schedule="uniform", pattern=args.pattern)
        try:
            config = osp.SparseScheduleConfig(preset="sparsegpt", dataset=calibration, num_samples=args.num_samples,
                                              seq_len=args.seq_len, tokenizer=tokenizer, **options)
        except TypeError:  # commits before the presets: the SparseGPT scan was the only solver
            config = osp.SparseScheduleConfig(dataset=calibration, num_samples=args.num_samples,
                                              seq_len=args.seq_len, tokenizer=tokenizer, **options)
        from optimum_sparsesched.obs.prune import KERNEL_ENV

        for kernel in args.kernels:
            os.environ[KERNEL_ENV] = kernel  # read when a compression starts
            c0 = cpu_seconds()
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=config)
            key = "ours" if kernel == "auto" else f"ours-{kernel}"
            result[key] = {"compress_cpu_s": cpu_seconds() - c0, "kernel": kernel,
                           "ppl": evaluate(model.to(DEVICE), tokenizer)}
            print(key, json.dumps(result[key]), flush=True)
            del model
    if args.out:
        write_result(args.out, result)


@torch.no_grad()
def reference_sequential_layer0(model, windows, ref, modelutils, layer0: dict) -> None:
    """Only block 0's Hessians (the reference's accumulation) and dense weights, into ``layer0``."""
    from optimum_sparsesched.pipeline.blocks import capture_block_inputs, run_block

    inputs = capture_block_inputs(model, windows, DEVICE, DEVICE)
    layer = model.model.layers[0]
    full = modelutils.find_layers(layer)
    gpts = {name: ref.SparseGPT(m) for name, m in full.items()}
    handles = [m.register_forward_hook(lambda _, inp, out, g=gpts[name]: g.add_batch(inp[0].data, out.data))
               for name, m in full.items()]
    for h in inputs.hidden:
        run_block(layer, h, inputs.args[0], inputs.kwargs[0], DEVICE, inputs.returns_tuple)
    for h in handles:
        h.remove()
    layer0.update({name: (g.H.clone(), g.nsamples, full[name].weight.detach().clone()) for name, g in gpts.items()})


if __name__ == "__main__":
    main()
