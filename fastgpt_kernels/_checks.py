"""Input validation shared by the public functions: errors that name the bad value."""
from __future__ import annotations

import math
import numbers

import torch


def tensor(name: str, t, *, optional: bool = False) -> None:
    """``t`` is a floating-point tensor (or None when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def same_device_and_dtype(**tensors) -> None:
    """All the given (non-None) tensors share one device and one dtype with the first, which is not None."""
    items = iter(tensors.items())
    first_name, first = next(items)  # the op's main input, never None
    device, dtype = first.device, first.dtype
    for name, t in items:
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {dtype}")


def shape(name: str, t, expected: tuple) -> None:
    """``t`` (if not None) has exactly the shape ``expected``."""
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def class_targets(name: str, t, shape: tuple, device: torch.device, classes: int, ignore_index) -> None:
    """``t`` is an int64 tensor of ``shape`` on ``device`` holding class indices in [0, classes) or
    ``ignore_index``; the values are checked on CPU tensors only (a GPU check would synchronise),
    and not while torch.compile traces (a branch on values would break its graph)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of class indices, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (x's leading dimensions), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if t.device.type != "cpu" or not t.numel() or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(t))
    if low < 0 or high >= classes:  # out of range, or ignore_index: find one that is not ignore_index
        bad = (t != ignore_index) & ((t < 0) | (t >= classes))
        if bad.any():
            position = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}{list(position)} = {int(t[position])} is not a class index in [0, {classes}) "
                             f"nor ignore_index ({ignore_index})")


def finite_nonnegative(name: str, value) -> None:
    """``value`` is a real, finite number >= 0."""
    _real(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def finite_positive(name: str, value) -> None:
    """``value`` is a real, finite number > 0."""
    _real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def probability(name: str, value) -> None:
    """``value`` is a real number in [0, 1), a usable dropout probability."""
    _real(name, value)
    if not 0 <= value < 1:  # NaN fails both comparisons
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
