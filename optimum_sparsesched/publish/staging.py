"""Writing a checkpoint into a folder the user owns: staged, swapped in file by file, nothing else touched.

:func:`staged_folder` is how this package writes a saved checkpoint (``save_pretrained``, ``push_to_hub``, and any
other writer of a whole checkpoint folder)::

    with staged_folder(save_directory) as staging:
        ...  # write every file of the new checkpoint into `staging`
    # now they are in save_directory

1. The folder is created if missing; a symlink to a folder is followed (the files go where it points, the link
   stays a link). An exclusive ``flock`` on the folder itself (no lock file is left) keeps two saves into one
   folder apart: the second is refused with a ``ValueError`` naming it. Without ``overwrite=True``, a folder holding
   a model we did not write, or the model's own source folder, is refused (:func:`check_overwrite`).
2. Leftovers of killed saves are removed: our staging folders (``.optimum-sparsesched-staging-*`` inside the target;
   holding the lock proves no live save owns them) and the sibling ``.NAME.tmp-XXXXXXXX`` folders of 0.2.
3. The caller writes into a private staging folder inside the target (every rename below is atomic).
4. On success every staged file is fsynced. A weight file that the new checkpoint does not replace but that
   transformers would load instead of it (a ``model.safetensors`` beside a new sharded index) must be ours, else the
   save is refused before the target is touched. Then the files are renamed into the target: auxiliary files (card,
   plot, generation config), weight files, our old weights that would shadow a new index are removed, the weight
   index, ``config.json`` last; finally weight files of an earlier save of ours that the new checkpoint no longer
   lists are removed. Nothing else is touched: ``.git/``, subfolders, your files, a README you wrote (the caller then
   writes no card), tokenizer files.
5. On any failure before the renames the staging folder is removed and the target is exactly as it was.

What an earlier save of ours wrote (:func:`files_of_our_checkpoint`): safetensors files carrying our marker
(:mod:`..formats.metadata`), and a weight index listing only such files. Anything else is never deleted (0.2's
dense weights carry no marker: they are kept, or the save is refused when they would shadow the new checkpoint).

At every instant the folder loads as the old checkpoint, as the new one, or is refused on load: while the renames
run, the weights present and ``config.json`` may come from different saves, and the new weight files record the
results digest that the load check of :mod:`..formats.metadata` compares with ``config.json``; a weights file
missing altogether fails transformers' own load. A kill at any instant never leaves a folder that loads a mix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..config import saved_config_dict
from ..formats.metadata import written_by_this_package

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, saves into one folder are not serialized
    fcntl = None

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".optimum-sparsesched-staging-"
CONFIG_FILE = "config.json"
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_LEGACY_STAGING = r"\.{name}\.tmp-[0-9a-f]{{8}}"  # sibling temporaries of optimum-sparsesched 0.2
_LEGACY_ASIDE = r"\.{name}\.old-[0-9a-f]{{8}}"  # the old folder moved aside by 0.2's two-rename swap


def resolve_folder(folder: str | os.PathLike) -> Path:
    """The folder files are written into: ``folder`` itself, or where it points when it is a symlink; created if
    missing. ValueError when it is a file."""
    path = Path(folder)
    real = Path(os.path.realpath(path))
    if real.exists() and not real.is_dir():
        raise ValueError(f"save_directory: {str(folder)!r} is a file, not a folder")
    real.mkdir(parents=True, exist_ok=True)
    return real


@contextmanager
def folder_lock(folder: Path, what: str = "save_directory") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself; ValueError naming ``what`` when another process holds it.
    No lock where the filesystem has none (some network filesystems) or on Windows."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{what}: {str(folder)!r} is being written by another save right now; wait for it to "
                             "finish or save into another folder") from None
        except OSError as exc:
            logger.debug("no lock on %s: %s", folder, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(folder: Path, given: Path | None = None) -> None:
    """Remove what killed saves left (call while holding :func:`folder_lock`): our staging folders inside
    ``folder``, and 0.2's sibling temporaries of ``given`` (the path as the caller named it). A folder that 0.2
    moved aside (``.NAME.old-*``, your old checkpoint) is only reported."""
    for entry in folder.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            logger.info("removing %s, left by a save that was killed", entry)
            shutil.rmtree(entry, ignore_errors=True)
    for path in {folder, Path(os.path.abspath(given)) if given is not None else folder}:
        name = re.escape(path.name)
        try:
            siblings = list(path.parent.iterdir())
        except OSError:  # a parent we may not list: nothing of ours to find there
            siblings = []
        for entry in siblings:
            if not entry.is_dir() or entry.is_symlink():
                continue
            if re.fullmatch(_LEGACY_STAGING.format(name=name), entry.name) and all(
                    p.is_file() for p in entry.iterdir()):
                logger.info("removing %s, left by a save of optimum-sparsesched 0.2 that was killed", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif re.fullmatch(_LEGACY_ASIDE.format(name=name), entry.name):
                logger.warning("%s is a copy of %s that an interrupted save of optimum-sparsesched 0.2 moved aside; "
                               "check it and delete it yourself", entry, path)


def files_of_our_checkpoint(folder: Path) -> set[str]:
    """Names of the weight files in ``folder`` that a save of this package wrote: safetensors files whose header
    carries our marker, and a weight index all of whose listed files that exist are such files."""
    ours = {p.name for p in folder.glob("*.safetensors")
            if p.is_file() and not p.is_symlink() and written_by_this_package(p)}
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        listed = {v for v in weight_map.values() if isinstance(v, str)} if isinstance(weight_map, dict) else set()
        present = {v for v in listed if (folder / v).exists()}
        if index.is_file() and not index.is_symlink() and present and present <= ours:
            ours.add(index.name)
    return ours


def foreign_model_files(folder: Path) -> list[str]:
    """The files that make ``folder`` hold a model this package did not write: a ``config.json`` not ours (and the
    weight files), or without one, weight files without our marker (0.2's dense weights have none: a folder whose
    ``config.json`` is ours holds our checkpoint)."""
    if not folder.is_dir():
        return []
    weights = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES + INDEX_SUFFIXES))
    config = folder / CONFIG_FILE
    if config.is_file():
        try:
            ours = saved_config_dict(json.loads(config.read_text(encoding="utf-8"))) is not None
        except (OSError, ValueError, UnicodeDecodeError):
            ours = False
        return [] if ours else [CONFIG_FILE, *weights]
    return sorted(set(weights) - files_of_our_checkpoint(folder))


def check_overwrite(folder: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None,
                    what: str = "save_directory") -> None:
    """The rule of every checkpoint writer (``save_pretrained``, ``compress_checkpoint``, the CLI): unless
    ``overwrite``, refuse (``ValueError`` naming ``what``) a ``folder`` holding a model this package did not write
    (:func:`foreign_model_files`) or that is ``source``, the folder the model was compressed from."""
    real = Path(os.path.realpath(folder))
    advice = "Save into another folder, or pass overwrite=True to replace it (nothing was changed)"
    if not overwrite and source is not None and os.path.isdir(source) and Path(os.path.realpath(source)) == real:
        raise ValueError(f"{what}: {str(folder)!r} is the folder the model was loaded from and compressed; saving "
                         f"there would replace its original weights. {advice}")
    foreign = [] if overwrite else foreign_model_files(real)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ValueError(f"{what}: {str(folder)!r} holds a model this package did not write ({shown}). {advice}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _phase(name: str) -> int:
    """Rename order: 0 auxiliary files, 1 weight files, 2 weight index, 3 config.json."""
    if name == CONFIG_FILE:
        return 3
    if name.endswith(INDEX_SUFFIXES):
        return 2
    return 1 if name.endswith(WEIGHT_SUFFIXES) else 0


def commit(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` into ``target`` (step 4 of the module docstring)."""
    new = {p.name: p for p in staging.iterdir()}
    for name, p in new.items():
        if p.is_dir() and (target / name).exists():
            raise ValueError(f"save_directory: {str(target / name)!r} exists and the save would replace it with a "
                             "folder; move it away")
        if p.is_file():
            _fsync(p)
    _fsync(staging, directory=True)
    ours = files_of_our_checkpoint(target)
    shadowing = set()  # old single weight files that transformers would load instead of a new index
    for index in (n for n in new if n.endswith(".safetensors.index.json")):
        single = index[: -len(".index.json")]
        if single not in new and (target / single).exists():
            if single not in ours:
                raise ValueError(
                    f"save_directory: {str(target)!r} holds {single}, which optimum-sparsesched did not write and "
                    f"which transformers would load instead of the new sharded checkpoint ({index}); move it away "
                    "or save into another folder (nothing was changed)")
            shadowing.add(single)
    for phase in range(4):
        if phase == 2:
            for name in sorted(shadowing):
                os.remove(target / name)
        for name in sorted(n for n in new if _phase(n) == phase):
            os.replace(new[name], target / name)
        _fsync(target, directory=True)
    for name in sorted(ours - set(new) - shadowing):
        if name.endswith(WEIGHT_SUFFIXES + INDEX_SUFFIXES):
            logger.info("removing %s, a weight file of the earlier save that the new checkpoint does not use", name)
            os.remove(target / name)
    _fsync(target, directory=True)


@contextmanager
def staged_folder(folder: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None,
                  what: str = "save_directory") -> Iterator[Path]:
    """A private staging folder inside ``folder`` to write a whole checkpoint into; on normal exit its files replace
    their namesakes in ``folder`` (:func:`commit`), on an exception ``folder`` stays as it was. Yields the staging
    folder's path. ``overwrite``, ``source``, ``what``: :func:`check_overwrite`, under the lock."""
    created = not os.path.exists(os.path.realpath(folder))
    target = resolve_folder(folder)
    with folder_lock(target):
        try:
            check_overwrite(target, overwrite, source, what)
        except ValueError:
            if created:
                target.rmdir()
            raise
        remove_leftovers(target, Path(folder))
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
        try:
            yield staging
            commit(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
