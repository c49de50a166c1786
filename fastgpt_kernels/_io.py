"""Files written whole and atomically (the one atomic write of the project), and the kernels' cache.

:func:`atomic_writer` is used by the kernels' caches and by fastgpt's checkpoints, token shards and
weight files: a reader sees the old file or the whole new one, never a part. :func:`cache_directory`
is where the kernels keep what they learn about a machine (autotuning choices, backend decisions);
:func:`write_cache` writes there, or says once why it cannot.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose content replaces ``path`` at once when the ``with`` block ends normally.

    Writes go to a new file with a random name (``.<name>.<16 hex digits>.tmp``) in ``path``'s
    directory, which must exist, with the permissions of any new file (0666 less the umask); at
    the end of the block it is flushed to disk and renamed over ``path``, so readers see the old
    file or the whole new one, never a part. When the block raises (KeyboardInterrupt included)
    the temporary file is removed and ``path`` is left as it was; a process killed outright leaves
    it behind, for :func:`stale_temp_files` to find.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # Created inside the try, so an interruption at any point after it exists still removes it.
    try:
        with open(tmp, "xb") as f:  # "x": a new file, never one that is already there
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def stale_temp_files(directory: str | os.PathLike, name_pattern: str) -> list[Path]:
    """The temporary files that :func:`atomic_writer` left in ``directory`` for targets whose names
    match the glob ``name_pattern`` (its process was killed before it could finish or clean up)."""
    return sorted(Path(directory).glob(f".{name_pattern}.*.tmp"))


CACHE_DIR_ENV = "FASTGPT_AUTOTUNE_CACHE"  # the kernels' cache directory; "off" keeps none


@functools.lru_cache(maxsize=1)
def cache_directory() -> Path | None:
    """The directory of the kernels' cache files: ``$FASTGPT_AUTOTUNE_CACHE``, by default
    ``~/.cache/fastgpt/autotune``; None when that is "off", or when there is no home directory to
    put it in (with a warning). Decided once per process."""
    directory = os.environ.get(CACHE_DIR_ENV)
    if not directory:
        try:
            directory = str(Path.home() / ".cache" / "fastgpt" / "autotune")
        except RuntimeError as exc:  # no HOME and no passwd entry
            cache_unwritable(f"no home directory ({exc})")
            return None
    return None if directory == "off" else Path(directory)


def cache_file(stem: str) -> Path | None:
    """The cache file ``<stem>-<GPU name>.json`` (characters a file name should not hold replaced)
    in :func:`cache_directory`; None when there is none. Every cache is kept per GPU."""
    import torch

    directory = cache_directory()
    if directory is None:
        return None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return directory / (re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{device}") + ".json")


_unwritable: list[str] = []  # why the cache could not be written, once it could not


def cache_unwritable(reason: str) -> None:
    """Keep what the cache would hold in memory only, from now on, saying why once."""
    if not _unwritable:
        _unwritable.append(reason)
        warnings.warn(f"fastgpt's autotuning cache cannot be written ({reason}): autotuning choices and backend "
                      f"decisions are kept in memory for this process only; set {CACHE_DIR_ENV} to a writable "
                      f"directory, or to off", RuntimeWarning, stacklevel=3)


def read_cache(path: Path | None) -> object:
    """A cache file's JSON, or None where there is none or it is damaged (its entries are then made again)."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(path: Path | None, content: object) -> None:
    """Write ``content`` as JSON to the cache file ``path`` (atomically); where the cache cannot be
    written (a read-only or missing home, a full disk), warn once (:func:`cache_unwritable`) and go on."""
    if path is None or _unwritable:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as f:
            f.write(json.dumps(content, indent=1).encode())
    except OSError as exc:
        cache_unwritable(f"{path}: {exc.strerror or exc}")
