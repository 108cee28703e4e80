"""The resume state of one run, as the block loop sees it: :class:`Resume` puts together the checkpoint folder
(:class:`.checkpoint.BlockCheckpoint`: block files, manifest, lock) and the digests of the weights it may be applied
to (:mod:`.digest`).

Without ``checkpoint_dir`` every method is a no-op and :meth:`Resume.restore` never restores. With one:

1. :meth:`Resume.open` (before any work) creates, proves writable and locks the folder on rank 0;
2. :meth:`Resume.load` (once the calibration windows exist) reads an earlier run's manifest when its fingerprint
   matches, checks the weights outside the blocks and those of every block it recorded against the model (another
   fine-tune is refused before the model is touched), and returns the schedule that run measured; for a fresh run
   whose schedule reads every block, every block's digest is taken now, before the weights change;
3. :meth:`Resume.start` records a fresh run's schedule (rank 0);
4. per block, in its visit: :meth:`Resume.note_weights` takes the block's digest before it is compressed,
   :meth:`Resume.restore` puts a finished block back (verified; a damaged file means this block and every later one
   are computed again, on every rank), :meth:`Resume.save` records a newly finished block (rank 0).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import BlockCheckpoint, block_state, restore_block
from .digest import block_digest, outside_digest
from .distributed import DistributedContext
from .sources import BlockSource, BlockVisit

logger = logging.getLogger(__name__)


class Resume:
    """The resume state of a run whose checkpoint folder is ``folder`` (``None``: no resume)."""

    def __init__(self, folder: str | None, ctx: DistributedContext) -> None:
        self.checkpoint = BlockCheckpoint(folder) if folder else None
        self.ctx = ctx
        self.manifest: dict[str, Any] | None = None
        self.digests: dict[int, str] = {}
        self.outside = ""
        self.finished = 0
        self.achieved: dict[str, float] = {}
        self.losses: dict[str, float] = {}

    def open(self) -> None:
        """Create, prove writable and lock the folder (rank 0): refused here, before any work."""
        if self.checkpoint is not None and self.ctx.is_main:
            self.checkpoint.open()

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()

    def load(self, fingerprint: Callable[[], str], model: nn.Module, source: BlockSource, device: torch.device,
             reads_all_blocks: bool) -> dict[str, Any] | None:
        """The schedule an interrupted run with the run's ``fingerprint()`` measured (``targets``, ``estimates``,
        ``resolved_range``), after checking the model's weights against it; ``None`` for a fresh run."""
        if self.checkpoint is None:
            return None
        self.checkpoint.fingerprint = fingerprint()
        manifest = self.checkpoint.load()
        self.outside = outside_digest(model, source.plan.blocks)

        def digest_of(index: int) -> str:  # an offloaded block is read once for it
            with source.visit(index, device) as visit:
                return block_digest(visit.block)

        if manifest is None:
            if reads_all_blocks:  # the schedule reads every block: a resume must find all of them unchanged
                self.digests = {i: digest_of(i) for i in range(len(source.plan.blocks))}
            return None
        self.checkpoint.check_weights(manifest, self.outside, digest_of)
        self.manifest = manifest
        self.digests = {int(k): v for k, v in manifest["weights"]["blocks"].items()}
        self.finished = manifest["finished_blocks"]
        self.achieved, self.losses = dict(manifest["achieved"]), dict(manifest["errors"])
        logger.info("resuming from %s after block %d", self.checkpoint.folder, self.finished - 1)
        return {k: manifest[k] for k in ("targets", "estimates", "resolved_range")}

    def start(self, targets: dict[str, float], estimates: dict[str, float],
              resolved_range: list[float] | None) -> None:
        """Record a fresh run's schedule and the digests known so far (rank 0)."""
        if self.checkpoint is not None and self.ctx.is_main and self.manifest is None:
            self.manifest = self.checkpoint.start(targets, estimates, resolved_range, self.outside, self.digests)

    def note_weights(self, visit: BlockVisit) -> None:
        """Take the digest of a block about to be compressed (its weights are materialised in the visit)."""
        if self.checkpoint is not None and visit.index >= self.finished and visit.index not in self.digests:
            self.digests[visit.index] = block_digest(visit.block)

    def restore(self, visit: BlockVisit) -> bool:
        """Put finished block ``visit.index`` back from its verified file (weights and grids) and return True; False
        when it has to be computed (then every later block is too)."""
        if visit.index >= self.finished:
            return False
        saved = self.checkpoint.load_block(self.manifest, visit.index) if self.manifest is not None else None
        if not all(self.ctx.merge_dicts({self.ctx.rank: saved is not None}).values()):
            self.finished = visit.index  # a damaged block file on some rank: recompute from here on every rank
            self.note_weights(visit)
            return False
        visit.grids.update(restore_block(visit.modules, saved))
        return True

    def save(self, visit: BlockVisit, achieved: dict[str, float], losses: dict[str, float]) -> None:
        """Record block ``visit.index``, just compressed, as finished (rank 0; its weights are still materialised)."""
        self.achieved.update(achieved)
        self.losses.update(losses)
        if self.checkpoint is not None and self.ctx.is_main and visit.index >= self.finished:
            self.checkpoint.save_block(self.manifest, visit.index, block_state(visit.modules, visit.grids), achieved,
                                       losses, self.digests[visit.index])
