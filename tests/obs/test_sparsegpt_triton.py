"""The Triton scan (optimum_sparsesched/obs/sparsegpt_triton.py) against the torch scan, run on the CPU by Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: the mode is fixed when the kernels are defined). The test extra
installs triton on Linux x86_64, so CI runs it; skipped only where triton cannot be installed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from optimum_sparsesched.obs.prune import prune
    from optimum_sparsesched.obs.spec import PruneSpec
    torch.manual_seed(0)
    results = []
    for rows, cols, case in json.loads(sys.argv[1]):
        X = torch.randn(cols, 3 * cols)
        X[: cols // 4] *= 4  # uneven input scales, as in real layers
        H = 2 * X @ X.T / X.shape[1]
        W = torch.randn(rows, cols)
        case = {k: tuple(v) if k == "nm" else v for k, v in case.items()}
        spec = PruneSpec(**{"block_size": 32, **case})
        a, b = prune(W, H, spec, kernel="torch"), prune(W, H, spec, kernel="triton")
        same_grid = a.grid is None or (torch.allclose(a.grid[0], b.grid[0], rtol=1e-6)
                                       and torch.equal(a.grid[1], b.grid[1]))
        results.append({"max_diff": float((a.weight - b.weight).abs().max()),
                        "masks": bool(((a.weight == 0) == (b.weight == 0)).all()),
                        "loss": [a.loss, b.loss], "grid": bool(same_grid)})
    print(json.dumps(results))
""")

CASES = [
    (24, 96, {"sparsity": 0.5}),
    (17, 80, {"sparsity": 0.7}),  # rows not a multiple of the row tile, a last block of 16 columns
    (16, 64, {"sparsity": 0.5, "nm": [2, 4]}),
    (16, 64, {"sparsity": 0.5, "nm": [4, 8]}),
    (16, 256, {"sparsity": 0.5, "nm": [2, 4], "block_size": 128}),  # what a CUDA user runs at 2:4 (its masks are
    # checked against SparseGPT's N:M rule through the torch scan: tests/obs/test_nm_reference.py)
    (24, 96, {"sparsity": 0.3, "bits": 4, "group_size": 16}),  # groups fitted inside the kernel
    (16, 96, {"sparsity": 0.6, "bits": 4, "group_size": 64, "sym": True}),  # groups fitted by torch per block pair
    (16, 64, {"sparsity": 0.5, "bits": 8, "group_size": -1}),
    (16, 64, {"sparsity": 0.5, "nm": [2, 4], "bits": 4, "group_size": 16}),
]


def test_triton_kernel_matches_the_torch_loop():
    import json

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for (rows, cols, case), got in zip(CASES, json.loads(run.stdout.strip().splitlines()[-1])):
        assert got["masks"], case
        assert got["max_diff"] < 1e-4, case
        assert got["loss"][1] == pytest.approx(got["loss"][0], rel=1e-4), case
        assert got["grid"], case


def test_triton_kernel_refused_where_it_cannot_run():
    import torch

    from conftest import solve

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        pytest.skip("the kernel can run here")
    with pytest.raises(ValueError, match="kernel: 'triton' needs"):
        solve(torch.randn(4, 8), torch.eye(8), 0.5, kernel="triton")
    with pytest.raises(ValueError, match="kernel"):
        solve(torch.randn(4, 8), torch.eye(8), 0.5, kernel="cuda")
