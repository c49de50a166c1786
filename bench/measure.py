"""Measuring: interleaved timing, peak memory of one call, and a description of the machine.

Timing. On a shared machine the speed of everything drifts while a benchmark runs, so the callables
being compared are timed in rounds, each round running every one of them once, in an order that
alternates from round to round; the figure is the median over the rounds. On a CUDA device each
call is timed with CUDA events; on a CPU with ``time.perf_counter``.

Peak memory. The most memory PyTorch's allocator holds for tensors during the call, minus what it
held before: activations, gradients, optimizer state and temporaries created by the call, not what
was allocated before it. On a CUDA device from ``torch.cuda.max_memory_allocated``; on a CPU, where
torch keeps no such counter, from the allocation events torch's profiler records with
``profile_memory=True`` (each carries the CPU allocator's running total). The process's resident
size is not used: glibc keeps freed blocks, so the same step measured 570 or 1200 MiB depending on
what had run before it, while the allocator's total is the same on every repeat.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time

import torch

CPU_MEMORY_METHOD = ("peak of the CPU allocator's running total during the call (torch.profiler memory "
                     "events) minus the total before it")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during the call minus the memory allocated before it"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, iterations: int = 1) -> float:
    """Seconds one call of ``fn()`` takes (CUDA events on a GPU, wall clock on a CPU): the time of
    ``iterations`` calls back to back, divided by them. On a GPU the calls queue up ahead of the
    kernels, so with enough of them the figure is the GPU's time, not the Python call's."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iterations
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def interleaved_times(fns: dict, device: torch.device, rounds: int, warmup: int = 1,
                      iterations: int = 1) -> dict[str, list[float]]:
    """Per name, the seconds a call took in each of ``rounds`` rounds, timed round-robin with the
    others (each round's figure over ``iterations`` calls: :func:`time_call`).

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
            times[name].append(time_call(fns[name], device, iterations))
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# --------------------------------------------------------------------------- peak memory


def memory_method(device: torch.device) -> str:
    """How :func:`peak_memory` measures on ``device``."""
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def peak_memory(fn, device: torch.device) -> int:
    """Bytes of tensor memory a call of ``fn()`` needs beyond what is allocated before it (see module doc)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # One "[memory]" event per allocation (+bytes) or release (-bytes), with the total after it.
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    if not memory:
        return 0
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - before


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
