"""Measuring: interleaved timing, peak memory of one call, and a description of the machine.

Timing. On a shared machine the speed of everything drifts while a benchmark runs, so the callables
being compared are timed in rounds, each round running every one of them once, in an order that
alternates from round to round; the figure is the median over the rounds. On a CUDA device each
call is timed with CUDA events; on a CPU with ``time.perf_counter``.

Peak memory. On a CUDA device: ``torch.cuda.max_memory_allocated`` during the call, minus what was
allocated before it. On a Linux CPU, where torch keeps no memory statistics: the growth of the
process's peak resident set size (``VmHWM``) during the call, after freed heap memory has been
handed back to the system (``malloc_trim``) and the peak reset to the current resident size
(``/proc/self/clear_refs``), with glibc's mmap threshold fixed at 128 KiB, so that every large
block is mapped on allocation and unmapped on release and the resident size follows the live
memory. (With glibc's default, adaptive threshold, freed blocks stay in the heap and the same
step measured 570 MiB or 1200 MiB depending on what ran before it.) That is the memory the call
needs beyond what is already resident: activations, gradients and temporaries, not the
parameters or the optimizer's state. Fixing the threshold changes the allocator for the rest of
the process (every large allocation then pays page faults), so peaks are measured after all
timings: :func:`fill_peak_memory`. Elsewhere peak memory is not measured (None).
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import re
import statistics
import time

import torch

CPU_MEMORY_METHOD = ("peak RSS growth during the call (Linux VmHWM after malloc_trim and a clear_refs reset "
                     "of the peak, glibc mmap threshold fixed at 128 KiB): memory needed beyond what was "
                     "resident before the call")
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
_MMAP_THRESHOLD = 128 * 1024
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during the call minus the memory allocated before it"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Seconds one call of ``fn()`` takes (CUDA events on a GPU, wall clock on a CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(fns: dict, device: torch.device, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Per name, the seconds each of ``rounds`` calls took, timed round-robin with the others.

    Each callable first runs ``warmup`` times untimed. Round r runs the callables in their given
    order when r is even and in reverse order when it is odd, so no one is always first.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(time_call(fns[name], device))
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# --------------------------------------------------------------------------- peak memory


def memory_method(device: torch.device) -> str | None:
    """How :func:`peak_memory` measures on ``device``, or None when it cannot."""
    if device.type == "cuda":
        return CUDA_MEMORY_METHOD
    if _linux_peak_rss_available():
        return CPU_MEMORY_METHOD
    return None


def peak_memory(fn, device: torch.device) -> int | None:
    """Bytes of memory a call of ``fn()`` needs beyond what is allocated before it (see module doc)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _linux_peak_rss_available():
        return None
    _libc().mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    _libc().malloc_trim(0)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def fill_peak_memory(jobs: list, device: torch.device) -> None:
    """Set ``row["peak_memory_bytes"] = peak_memory(fn)`` for every ``(row, fn)`` in ``jobs``: run it
    after every timing of the process (see the module doc)."""
    for row, fn in jobs:
        row["peak_memory_bytes"] = peak_memory(fn, device)


def _libc():
    return ctypes.CDLL(None)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@functools.lru_cache(maxsize=None)
def _linux_peak_rss_available() -> bool:
    if platform.system() != "Linux":
        return False
    try:
        _libc().malloc_trim
        _libc().mallopt
        _reset_peak_rss()
        _status_bytes("VmHWM")
    except (OSError, AttributeError):
        return False
    return True


# --------------------------------------------------------------------------- the machine


def machine_info(device: torch.device) -> dict:
    """What produced the figures: CPU model, cores, threads, GPU, library versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
