#!/usr/bin/env python3
"""How far must a block's pruning error travel before a second-order estimate predicts its end-to-end damage?

For every block ``b`` pruned alone at the target (SparseGPT on the dense inputs' Hessians, as ``kl-alone`` prunes),
its perturbed stream ``δh`` is run through the dense blocks after it; after ``k`` more blocks the diagonal-Fisher
estimate ``½ Σ_{t,i} g_{t,i}² δh_{t,i}² / T`` (``g``: the gradient of the sampled-label NLL w.r.t. that hidden
state, from one backward pass of the dense model) and the relative error ``‖δh‖²/‖h‖²`` are recorded, and at the
end the exact per-token KL. Prints, for each ``k``, the rank correlation over blocks of the estimate after ``k``
blocks with the exact KL — ``k = 0`` is the O(L) one-backward estimate, ``k = L`` the L² measurement.

    OMP_NUM_THREADS=2 python benchmarks/damage_propagation.py MODEL_DIR [--sparsity 0.7] [--probe-samples 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_eval_text, write_result  # noqa: E402
from schedule_damage import spearman  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--text", default="wikitext2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_sparsesched import SparseScheduleConfig
    from optimum_sparsesched.obs.inverse import InverseHessian
    from optimum_sparsesched.pipeline.blocks import capture_block_inputs, find_decoder_blocks, head_and_embeddings_on
    from optimum_sparsesched.pipeline.calibration import calibration_windows
    from optimum_sparsesched.pipeline.hessians import collect_block_hessians
    from optimum_sparsesched.pipeline.plan import plan_compression
    from optimum_sparsesched.pipeline.sources import BlockSource
    from optimum_sparsesched.schedule import fisher
    from optimum_sparsesched.schedule.statistics import _kl_per_token, logits_from_last_hidden, pruned_alone

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    cfg = SparseScheduleConfig(sparsity=a.sparsity, dataset=load_eval_text(a.text, calibration=True), num_samples=16,
                               seq_len=a.seq_len, probe_samples=a.probe_samples)
    plan, spec = plan_compression(model, cfg.plan_spec()), cfg.schedule_spec()
    probe = calibration_windows(cfg.dataset, tok, 16, a.seq_len, 0)[: a.probe_samples]
    device = torch.device("cpu")
    source = BlockSource(plan)
    inputs = source.inputs = capture_block_inputs(model, probe, device)
    L = len(plan.blocks)

    def run(i, hidden):
        with source.visit(i, device) as visit:
            return [visit.forward(h) for h in hidden]

    dense = [[h.clone() for h in inputs.hidden]]
    for i in range(L):
        dense.append(run(i, dense[-1]))
    _, blocks = find_decoder_blocks(model)
    G = [None] * (L + 1)  # G[j]: gradient w.r.t. dense[j] (the input of block j; G[L]: the last output)
    for i, grads in fisher.output_gradients(model, source, inputs, probe, dense, 0, device):
        G[i + 1] = grads
    with head_and_embeddings_on(model, device):
        refs = [torch.log_softmax(logits_from_last_hidden(model, blocks, probe[w:w + 1], h, inputs.returns_tuple)
                                  .float(), -1) for w, h in enumerate(dense[L])]
    tokens = probe.numel()
    fisher_est = [[0.0] * (L + 1) for _ in range(L)]  # [b][j]: estimate from the stream at depth j (> b)
    rel = [[0.0] * (L + 1) for _ in range(L)]
    kl = [0.0] * L
    for b in range(L):
        with source.visit(b, device) as visit:
            acc = collect_block_hessians(visit, dense[b])
            pruned = pruned_alone(visit, {n: InverseHessian(x.H, spec.damp) for n, x in acc.items()}, spec)
            with visit.swapped(pruned):
                stream = [visit.forward(h) for h in dense[b]]
        for j in range(b + 1, L + 1):
            if j > b + 1:
                stream = run(j - 1, stream)
            d = [s - h for s, h in zip(stream, dense[j])]
            fisher_est[b][j] = sum(0.5 * float((g ** 2 * x ** 2).sum()) for g, x in zip(G[j], d)) / tokens
            rel[b][j] = sum(float((x ** 2).sum()) for x in d) / sum(float((h ** 2).sum()) for h in dense[j])
        with head_and_embeddings_on(model, device):
            kl[b] = sum(_kl_per_token(refs[w], logits_from_last_hidden(model, blocks, probe[w:w + 1], s,
                                                                       inputs.returns_tuple))
                        for w, s in enumerate(stream)) / len(stream)
        print(f"block {b}: KL {kl[b]:.4g}  fisher@+1 {fisher_est[b][b + 1]:.4g}  fisher@end {fisher_est[b][L]:.4g}",
              flush=True)
    result = {"kl": kl, "fisher": fisher_est, "rel": rel, "correlation": {}}
    for k in (1, 2, 3, 4, 6, 8, 12, 16, L):
        f_k = [fisher_est[b][min(b + k, L)] for b in range(L)]
        r_k = [rel[b][min(b + k, L)] for b in range(L)]
        result["correlation"][k] = {"fisher": spearman(f_k, kl), "rel": spearman(r_k, kl)}
        print(f"k={k}: spearman(fisher after k blocks, KL) = {spearman(f_k, kl):.3f}, "
              f"spearman(relative error after k blocks, KL) = {spearman(r_k, kl):.3f}")
    name = Path(a.model.rstrip("/")).name
    write_result(a.out or f"benchmarks/results/schedule24/propagation-{name}.json", result)


if __name__ == "__main__":
    main()
