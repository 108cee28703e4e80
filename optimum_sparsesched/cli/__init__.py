"""Command line: ``optimum-sparsesched compress [MODEL [OUT]] [-o OUT] [options]``, ``optimum-sparsesched eval MODEL
[--dataset FILE] [--tasks T1,T2]`` and ``optimum-sparsesched push OUT REPO_ID``; the same commands run as
``optimum-cli sparse-schedule ...``.

With no MODEL, ``compress`` compresses the embedded default (:mod:`.default_model`, fetched once through
:mod:`.pinned_download`) on the shipped calibration text and prints perplexity before and after with the one
protocol of :mod:`..eval.perplexity`; ``MODEL OUT`` with no measurement asked streams checkpoint to checkpoint.
Every input is checked before the model loads (:mod:`.inputs`; the options are declared in :mod:`.options`); a bad
one prints one line on stderr and exits 2 (exit codes: 0 ok, 2 bad input). The commands themselves are in
:mod:`.commands`.
"""

from .commands import load_compress_save, main

__all__ = ["main", "load_compress_save"]
