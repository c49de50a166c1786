"""Files written whole and atomically: the one atomic write of the project.

Used by the kernels' autotuning cache and by fastgpt's checkpoints, token shards and weight files:
a reader sees the old file or the whole new one, never a part.
"""
from __future__ import annotations

import contextlib
import os
import secrets
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
