"""Host memory while blocks are offloaded or streamed: large allocations get pages of their own
(:func:`optimum_sparsesched.pipeline.host_memory.map_large_allocations`), so freed blocks leave no heap behind."""

import subprocess
import sys

import pytest

from optimum_sparsesched.pipeline.host_memory import libc_function

# In a fresh process (the setting is process-wide): free 8 MiB tensors three times and report the anonymous memory
# left behind, before and after map_large_allocations().
SCRIPT = """
import torch
from optimum_sparsesched.pipeline.host_memory import map_large_allocations

def anon_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))

def left_behind():
    before = anon_kib()
    for _ in range(3):
        x = torch.ones(2**21)  # 8 MiB
        del x
    return anon_kib() - before

default = left_behind()
assert map_large_allocations()
print(default, left_behind())
"""


@pytest.mark.skipif(libc_function("malloc_trim") is None or libc_function("mallopt") is None
                    or not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
def test_freed_large_tensors_go_back_to_the_os_once_large_allocations_are_mapped():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    default, mapped = map(int, run.stdout.split())
    assert default >= 4096  # glibc's own threshold kept a freed block in the heap: the measure sees it
    assert mapped < 1024
