"""``run_compressed="sparse"``: a compact Linear run by this package's sparse kernel (``sparse_kernel.c``), compiled
at load time with the system's C compiler — the weights stay in the compact form (bitmask + values, or + 4/8-bit
codes and their grid) and the forward reads them once, without decoding a dense weight.

For ``x`` ``[n, cols]`` with ``n`` ≤ :data:`MAX_ROWS` on the CPU (the steps of ``generate``: one token per sequence;
a short prompt) the kernel computes ``y = x Wᵀ`` in float32 from every kept weight, dequantized and cast to the model
dtype exactly as the decoding load writes it (:func:`.compact.decode_weight`): the weights are the decoded model's bit
for bit, the summation order is not (outputs within float32 rounding of ``F.linear`` on the decoded weight, then cast
to the model dtype). Longer inputs (a long prompt, a perplexity window), inputs on another device or needing a
gradient take the compact decoding of ``run_compressed=True`` (:mod:`.fast_decode`), which the matmul then amortizes.

Work per call: one pass over the module's mask bytes and kept weights per 8 rows of ``x`` (AVX-512: 16 columns per step, the kept
weights moved to their columns by ``vexpandps``; otherwise a scalar loop over the set bits), rows split over
``torch.get_num_threads()`` OpenMP threads. The library is built once per process into a private temporary folder
(``cc -O3 -march=native -shared``, with ``-fopenmp`` when the compiler has it; ~0.2 s), loaded, and the folder
removed: nothing is cached on disk. ``CC`` names another compiler.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("sparse_kernel.c")
#: the model dtypes the kernel computes for (its ``F32``/``BF16``/``F16`` codes)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: the most input rows a module runs through the kernel; longer inputs are decoded. A 1536×576 weight at 30% kept,
#: INT4, 2 threads: ~0.17 ms per pass of 8 rows, so 64 rows (~1.4 ms) cost about one decode (~1.5 ms), after which
#: one decode and a matmul are cheaper
MAX_ROWS = 64
#: compiler flag sets tried in turn: the host's vector units and OpenMP, then without either
_FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())
#: the process that loaded each build (by the id of its ``sparse_linear``): only that one runs it on several threads
_LOADED_IN: dict[int, int] = {}


class KernelUnavailable(RuntimeError):
    """The kernel could not be built here (no C compiler, or it failed on the source)."""


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split like a shell word list), else ``cc``, ``gcc`` or ``clang`` on the
    PATH; None when there is none."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    return None if found is None else [found]


@functools.lru_cache(maxsize=None)
def load(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled kernel (built once per process and ``defines``: extra ``-D`` flags, which tests use to build the
    scalar loop on an AVX-512 host). Raises :class:`KernelUnavailable` with the compiler's message."""
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (looked for $CC, cc, gcc, clang)")
    errors = []
    with tempfile.TemporaryDirectory(prefix="optimum_sparsesched-kernel-", ignore_cleanup_errors=True) as folder:
        library = Path(folder) / "sparse_kernel.so"
        for flags in _FLAG_SETS:
            command = [*cc, "-O3", "-fPIC", "-shared", *flags, *(f"-D{d}" for d in defines), str(SOURCE), "-o",
                       str(library), "-lm"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise KernelUnavailable(f"{shlex.join(command)} failed: {error}") from None
            if done.returncode == 0:
                break
            errors.append(f"{shlex.join(command)} exited with {done.returncode}: "
                          f"{' '.join(done.stderr.split())[-300:] or 'no message'}")
        else:  # the last, plainest command's error
            raise KernelUnavailable(f"the C compiler failed on the kernel ({errors[-1]})")
        lib = ctypes.CDLL(str(library))  # stays mapped after the folder is removed
        _LOADED_IN[id(lib.sparse_linear)] = os.getpid()  # (a ctypes function is not hashable)
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sparse_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, i32, ptr, i32, ptr, ptr, i64, i32, ptr, ptr, i32]
    lib.sparse_linear.restype = i32
    lib.sparse_kernel_vectorized.restype = i32
    return lib


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None when it can (building it now if not yet built)."""
    try:
        load()
    except KernelUnavailable as error:
        return str(error)
    return None


def vectorized(defines: tuple[str, ...] = ()) -> bool:
    """Whether the build for ``defines`` runs the AVX-512 path (else the scalar loop)."""
    return bool(load(defines).sparse_kernel_vectorized())


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


@dataclass(frozen=True)
class Prepared:
    """One module's kernel arguments but the input: ``rows``, ``cols``, the argument tuple (addresses of the
    contiguous tensors held in ``tensors``, dtypes, grid), and ``function`` (the build's ``sparse_linear``)."""

    rows: int
    cols: int
    arguments: tuple
    tensors: tuple
    function: Any


def prepare(mask: torch.Tensor, starts: torch.Tensor, cols: int, dtype: torch.dtype,
            values: torch.Tensor | None = None, codes: torch.Tensor | None = None, bits: int | None = None,
            scale: torch.Tensor | None = None, zero: torch.Tensor | None = None, group_size: int = -1,
            defines: tuple[str, ...] = ()) -> Prepared:
    """The kernel's arguments for a weight ``W`` ``[rows, cols]`` in the model ``dtype`` given by its checked
    compact tensors on the CPU (see :mod:`.compact`): ``mask`` uint8 ``[rows, ⌈cols/8⌉]``, ``starts`` int64
    ``[rows]`` (kept weights before each row), and ``values`` ``[nnz]`` or ``codes``/``bits``/``scale`` bfloat16
    ``[rows, groups]``/``zero`` (None: symmetric)/``group_size`` (-1: one group per row). The result holds the
    tensors it points to; it is valid as long as they are not modified in place."""
    tensors = tuple(t.contiguous() if t is not None else None for t in (mask, starts, values, codes, scale, zero))
    mask, starts, values, codes, scale, zero = tensors
    vdtype = DTYPES[values.dtype] if values is not None else 0
    arguments = (_address(mask), _address(starts), _address(values), vdtype, _address(codes), bits or 0,
                 _address(scale), _address(zero), cols if group_size == -1 else group_size, DTYPES[dtype])
    return Prepared(mask.shape[0], cols, arguments, tensors, load(defines).sparse_linear)


def run(prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` float32 ``[n, rows]`` for ``x`` float32 contiguous ``[n, cols]``, ``n`` ≥ 1 (the kernel passes over
    ``W`` once per 8 rows of ``x``)."""
    n = x.shape[0]
    if n < 1 or x.dtype != torch.float32 or x.shape[1] != prepared.cols or not x.is_contiguous():
        raise ValueError(f"sparse kernel: x must be float32 contiguous [n >= 1, {prepared.cols}], got "
                         f"{x.dtype} {tuple(x.shape)}")
    y = torch.empty(n, prepared.rows, dtype=torch.float32)
    # OpenMP's thread pool does not survive a fork: a forked process (a DataLoader worker) runs the kernel serially
    threads = max(1, torch.get_num_threads()) if os.getpid() == _LOADED_IN.get(id(prepared.function)) else 1
    status = prepared.function(prepared.rows, prepared.cols, n, *prepared.arguments, x.data_ptr(), y.data_ptr(),
                               threads)
    if status != 0:
        raise ValueError(f"sparse kernel: arguments refused (rows={prepared.rows}, cols={prepared.cols}, n={n}, "
                         f"arguments {prepared.arguments})")
    return y


def linear(x: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, cols: int, dtype: torch.dtype,
           values: torch.Tensor | None = None, codes: torch.Tensor | None = None, bits: int | None = None,
           scale: torch.Tensor | None = None, zero: torch.Tensor | None = None, group_size: int = -1,
           defines: tuple[str, ...] = ()) -> torch.Tensor:
    """``x Wᵀ`` float32 ``[n, rows]`` for ``x`` float32 ``[n, cols]``: :func:`prepare` then :func:`run`."""
    return run(prepare(mask, starts, cols, dtype, values, codes, bits, scale, zero, group_size, defines),
               x.contiguous())
