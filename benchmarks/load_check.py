"""What checking every tensor against its digest costs when a compressed checkpoint loads.

    python benchmarks/load_check.py CHECKPOINT [--repeats 3] [--json OUT]

CHECKPOINT: a folder saved by this package (e.g. SmolLM2-135M compressed by ``optimum-sparsesched compress MODEL
OUT``). Each repeat, in this process: ``from_pretrained(CHECKPOINT)`` with the checks as they are, and with the
digest check of :func:`optimum_sparsesched.formats.metadata.check_tensor_digests` switched off; and the time to read
every weight file once (the floor of any load). Reported: median seconds of each, and the check's share of the load.
The files are read once before timing, so every figure is from the page cache (a cold disk makes the check's share
smaller: it reads the bytes transformers then finds in the cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timed(action) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import optimum_sparsesched  # noqa: F401  (registers the load path)
    import optimum_sparsesched.formats.metadata as metadata

    files = sorted(Path(a.checkpoint).glob("*.safetensors"))

    def read_files() -> None:
        for f in files:
            with open(f, "rb") as stream:
                while stream.read(1 << 24):
                    pass

    checked = metadata.check_tensor_digests
    read_files()
    rows = {"read_files_s": [], "load_checked_s": [], "load_unchecked_s": [], "check_only_s": []}
    for _ in range(a.repeats):
        rows["read_files_s"].append(timed(read_files))
        rows["load_checked_s"].append(timed(lambda: AutoModelForCausalLM.from_pretrained(a.checkpoint)))
        metadata.check_tensor_digests = lambda *args, **kwargs: None
        try:
            rows["load_unchecked_s"].append(timed(lambda: AutoModelForCausalLM.from_pretrained(a.checkpoint)))
        finally:
            metadata.check_tensor_digests = checked
        rows["check_only_s"].append(timed(lambda: [checked(f, json.loads(metadata.read_weights_metadata(f)
                                                                         [metadata.DIGESTS_KEY])) for f in files]))
    result = {k: statistics.median(v) for k, v in rows.items()}
    result.update(bytes=sum(f.stat().st_size for f in files), threads=torch.get_num_threads(),
                  check_share_of_load=(result["load_checked_s"] - result["load_unchecked_s"]) / result["load_checked_s"])
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
