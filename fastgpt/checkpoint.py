"""Checkpoints: written atomically, read back with errors that say what is wrong with the file.

A checkpoint is one ``torch.save`` file holding a dict with a format tag, a version, and whatever
the training loop puts in it (model and optimizer state, configs, step, RNG states, data position).
It is written through :func:`atomic_writer` (:mod:`fastgpt_kernels._io`, the project's one atomic write,
also used for token files, Hugging Face weight files and the kernels' autotuning cache): to a
temporary file in the same directory, flushed to disk and renamed over the target, so an
interruption leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastgpt_kernels._io import atomic_writer, stale_temp_files

__all__ = ["FORMAT", "VERSION", "save", "load", "atomic_writer", "stale_temp_files"]

FORMAT = "fastgpt-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "step")


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
