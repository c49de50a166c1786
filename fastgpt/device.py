"""Where and in what precision a run trains: the device, the dtype (``--dtype auto`` decided from what
the hardware is), its autocast and its GradScaler."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the current CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return device


# CPU feature flags that mean bf16 matrix instructions, so bf16 autocast pays: AMX-BF16 and
# AVX512-BF16 on x86 (the ``flags`` line of /proc/cpuinfo), FEAT_BF16 (BFMMLA) on aarch64 (``Features``).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_features(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from Linux's ``cpuinfo`` (the first ``flags`` or ``Features`` line);
    empty on other systems or when the file cannot be read."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def auto_dtype(device: torch.device) -> tuple[str, str]:
    """What ``--dtype auto`` trains in on ``device``, and why (for the log).

    On a GPU: bfloat16 where supported, else float16 (with a GradScaler). On a CPU: bfloat16 when
    it has bf16 matrix instructions (:data:`CPU_BF16_FLAGS`), else float32. Decided from what the
    hardware is, never from a timing, so the same command trains in the same precision every run.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU supports bfloat16"
        return "float16", "auto: the GPU lacks bfloat16, so float16 with a GradScaler"
    features = cpu_features()
    flag = next((f for f in CPU_BF16_FLAGS if f in features), None)
    if flag is None:
        return "float32", f"auto: the CPU has none of {', '.join(CPU_BF16_FLAGS)}"
    return "bfloat16", f"auto: the CPU has {flag}"


def resolve_dtype(name: str, device: torch.device) -> str:
    """The precision to train in: ``name``, checked against ``device``, or for ``"auto"``
    :func:`auto_dtype`'s choice."""
    if name not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}: expected auto, float32, bfloat16 or float16")
    if device.type == "cpu" and name == "float16":
        raise ValueError("float16 autocast is not supported on the CPU: use --dtype bfloat16 or float32")
    return auto_dtype(device)[0] if name == "auto" else name


def run_dtype(name: str, device: torch.device, saved: str | None) -> tuple[str, str]:
    """The run's precision and why: as asked; for ``"auto"`` on --resume the checkpoint's
    (``saved``), so a run does not change precision halfway; else :func:`auto_dtype`'s."""
    if name != "auto":
        return resolve_dtype(name, device), f"--dtype {name}"
    if saved is not None:
        return resolve_dtype(saved, device), "auto on --resume: the checkpoint's"
    return auto_dtype(device)


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for float16 only: small gradients underflow float16's narrow exponent
    range, while bfloat16 has float32's."""
    return torch.amp.GradScaler(device.type, enabled=(dtype == "float16"))


def autocast_context(device: torch.device, dtype: str):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))
