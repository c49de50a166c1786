"""Checkpoints: written atomically, read back with errors that say what is wrong with the file.

A checkpoint is one ``torch.save`` file holding a dict with a format tag, a version, and whatever
the training loop puts in it (model and optimizer state, configs, step, RNG states, data position).
It is written through :func:`atomic_writer` (the project's one atomic write, also used for token
files and Hugging Face weight files): to a temporary file in the same directory, flushed to disk
and renamed over the target, so an interruption leaves either the old checkpoint or the new one,
never half of one.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

FORMAT = "fastgpt-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "step")


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


def save(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (must hold ``REQUIRED_KEYS``) to ``path`` atomically; returns the path."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing {', '.join(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save`, tensors moved to ``map_location`` (default CPU).

    Raises FileNotFoundError when there is no file, and ValueError naming the path when the file is
    not a fastgpt checkpoint, is truncated, or lacks required entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on foreign or cut-off files
        raise ValueError(f"{path} is not a readable fastgpt checkpoint (truncated or another kind of file): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is a PyTorch file but not a fastgpt checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} is checkpoint format version {state.get('version')}; this fastgpt reads {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return state
