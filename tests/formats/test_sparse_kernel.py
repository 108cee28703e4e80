"""run_compressed="sparse": the compiled sparse kernel computes with the decoded model's weights bit for bit (read
back through one-hot inputs) and sums within float32 rounding of ``F.linear``, for values and codes, every model
dtype, group sizes that do not split into its 16-column steps, odd shapes, both its AVX-512 and scalar builds; the
module runs short inputs through it and longer ones, gradients and other devices through the decoding; a checkpoint
loaded with it matches the decoded model and saves the same tensors; a missing compiler is refused before loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, load_run_compressed, random_compact, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.formats import sparse_kernel
from optimum_sparsesched.formats.compressed_linear import CompressedLinear
from optimum_sparsesched.formats.run_compressed import check_sparse_kernel

FAST = {**UNIFORM, "preset": "sparsegpt"}
#: the default build (AVX-512 here when the host has it), the scalar loop, the scalar loop with the software
#: float16 rounding (compilers without ``_Float16``)
BUILDS = [(), ("SPARSE_KERNEL_SCALAR",), ("SPARSE_KERNEL_SCALAR", "SPARSE_KERNEL_NO_FLOAT16")]

pytestmark = pytest.mark.skipif(sparse_kernel.unavailable_reason() is not None,
                                reason=f"no C compiler: {sparse_kernel.unavailable_reason()}")


def compact_module(rows, cols, dtype, bits=None, group_size=-1, sym=False, density=0.3, seed=0, bias=True):
    """A ``CompressedLinear`` of a random weight pruned to ``density`` (on a ``bits`` grid, or values in ``dtype``)
    and its weight as :func:`.compact.decode_weight` decodes it, in ``dtype``."""
    tensors, weight = random_compact(rows, cols, bits, group_size, sym, seed, dtype, density)
    b = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 1)).to(dtype) if bias else None
    return CompressedLinear(cols, rows, tensors, dtype, bits, group_size, sym, bias=b), weight


CASES = [  # rows, cols, bits, group_size, sym, density
    (24, 64, None, -1, False, 0.3), (7, 37, None, -1, False, 0.5), (16, 160, 4, 32, False, 0.3),
    (16, 100, 4, 24, True, 0.6), (9, 75, 4, -1, False, 0.3), (16, 96, 8, 32, False, 0.4), (5, 53, 8, 40, True, 0.7),
    (32, 128, 4, 128, False, 1.0), (8, 48, 4, 16, False, 0.0), (300, 512, 4, 128, False, 0.3)]  # 300x512: threads


@pytest.mark.parametrize("defines", BUILDS, ids=["default", "scalar", "scalar-soft-f16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,bits,group_size,sym,density", CASES)
def test_the_kernel_uses_the_decoded_weights_and_sums_like_a_matmul(rows, cols, bits, group_size, sym, density,
                                                                     dtype, defines):
    module, weight = compact_module(rows, cols, dtype, bits, group_size, sym, density)
    starts = module._decode_plan().starts.view(-1).to(torch.int64)
    kwargs = dict(values=getattr(module, "weight_values", None), codes=getattr(module, "weight_codes", None),
                  bits=bits, scale=getattr(module, "weight_scale", None), zero=getattr(module, "weight_zero", None),
                  group_size=group_size, defines=defines)
    n = 20  # rows of x per call: the kernel's blocks of 8, and a partial one
    read = torch.cat([sparse_kernel.linear(torch.eye(cols)[c:c + n], module.weight_mask, starts, cols, dtype,
                                           **kwargs) for c in range(0, cols, n)])  # one-hot rows: W's columns
    assert torch.equal(read.t(), weight.to(torch.float32))
    for tokens in (1, 3, 8, 11):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        y = sparse_kernel.linear(x, module.weight_mask, starts, cols, dtype, **kwargs)
        torch.testing.assert_close(y, F.linear(x.double(), weight.double()).float(), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 45), bits=st.sampled_from([None, 4, 8]),
       group_size=st.sampled_from([-1, 1, 8, 16, 20]), sym=st.booleans(), seed=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       density=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]), defines=st.sampled_from(BUILDS[:2]))
def test_the_kernel_reads_decode_weights_values(rows, cols, bits, group_size, sym, seed, dtype, density, defines):
    tensors, expected = random_compact(rows, cols, bits, group_size, sym, seed, dtype, density)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), expected.ne(0).sum(1).cumsum(0)[:-1]])
    args = dict(values=tensors.get("weight_values"), codes=tensors.get("weight_codes"), bits=bits,
                scale=tensors.get("weight_scale"), zero=tensors.get("weight_zero"), group_size=group_size,
                defines=defines)
    n = 13
    read = torch.cat([sparse_kernel.linear(torch.eye(cols)[c:c + n], tensors["weight_mask"], starts, cols, dtype,
                                           **args) for c in range(0, cols, n)])
    assert torch.equal(read.t(), expected.to(torch.float32))


def test_the_default_build_is_vectorized_where_the_host_has_avx512():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl")):
        assert sparse_kernel.vectorized()
    assert not sparse_kernel.vectorized(("SPARSE_KERNEL_SCALAR",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_module_runs_short_inputs_in_the_kernel_and_the_rest_decoded(dtype, monkeypatch):
    module, weight = compact_module(40, 96, dtype, 4, 32, False, 0.3)
    assert module.use_sparse_kernel() and "sparse_kernel=True" in repr(module)
    calls = []
    real = sparse_kernel.run
    monkeypatch.setattr(sparse_kernel, "run", lambda prepared, x: calls.append(x.shape) or real(prepared, x))
    short = torch.randn(2, 1, 96).to(dtype)
    expected = F.linear(short.double(), weight.double(), module.bias.double())
    torch.testing.assert_close(module(short).double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert calls == [(2, 96)]
    long = torch.randn(1, sparse_kernel.MAX_ROWS + 1, 96).to(dtype)  # a prompt: decoded, bit for bit
    assert torch.equal(module(long), F.linear(long, weight, module.bias)) and len(calls) == 1
    grad = torch.randn(1, 1, 96, requires_grad=True).to(dtype)  # a backward needs the decoded weight
    module(grad).sum().backward()
    assert len(calls) == 1
    wide, _ = compact_module(8, 16, torch.float64)  # a dtype the kernel does not compute: decoded
    assert not wide.use_sparse_kernel() and not wide.sparse_kernel


def test_a_checkpoint_loaded_with_the_sparse_kernel(tmp_path, tokenizer):
    model = tiny_model("llama")
    compress(model, SparseScheduleConfig(sparsity=0.6, bits=4, group_size=32, **FAST), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "int4")
    decoded = AutoModelForCausalLM.from_pretrained(tmp_path / "int4")
    fast = load_run_compressed(tmp_path / "int4", run_compressed="sparse")
    kept = [m for m in fast.modules() if isinstance(m, CompressedLinear)]
    assert kept and all(m.sparse_kernel for m in kept)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = fast.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ref = decoded.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    for a, b in zip(out.logits, ref.logits):  # prompt decoded; every new token through the kernel
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    fast.save_pretrained(tmp_path / "again")  # the checkpoint again, tensor for tensor
    stored, again = (load_file(f / "model.safetensors") for f in (tmp_path / "int4", tmp_path / "again"))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)
    half = load_run_compressed(tmp_path / "int4", run_compressed="sparse", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(half(ids[:, :1]).logits.float(), decoded(ids[:, :1]).logits, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("cc,reason", [("/nonexistent/cc", "failed"), ("false", "the C compiler failed")])
def test_no_compiler_is_refused_before_loading(cc, reason, monkeypatch):
    monkeypatch.setenv("CC", cc)
    sparse_kernel.load.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"(?s)run_compressed='sparse'.*{reason}.*run_compressed=True"):
            check_sparse_kernel()
    finally:
        sparse_kernel.load.cache_clear()
    assert SparseScheduleConfig(run_compressed="sparse").run_compressed == "sparse"
    with pytest.raises(ValueError, match=r"run_compressed.*'compact', 'int4' or 'sparse'"):
        SparseScheduleConfig(run_compressed="sparse-kernel")


def _forward_in_child(module, x, expected, queue):
    queue.put(bool(torch.allclose(module(x).float(), expected, rtol=1e-5, atol=1e-5)))


def test_a_forked_process_runs_the_kernel(monkeypatch):
    """OpenMP's thread pool does not survive a fork: after the parent ran the kernel on 2 threads, a forked child
    (a DataLoader worker, a multiprocessing pool) must run it (serially) instead of hanging."""
    import multiprocessing

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    module, weight = compact_module(512, 256, torch.float32, 4, 64, False, 0.3, bias=False)  # big enough to thread
    assert module.use_sparse_kernel()
    x = torch.randn(1, 256)
    expected = F.linear(x, weight)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forward_in_child, args=(module, x, expected, queue))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked process hung in the kernel")
    assert child.exitcode == 0 and queue.get(timeout=5)
