"""Which side serves an op under ``auto`` on a GPU: its Triton kernel or the PyTorch reference.

A fused kernel is not faster by being fused: on some GPU, for some op and shape, PyTorch's own op
(cuDNN's attention, ATen's LayerNorm) wins. So under ``auto``, on a CUDA device, the first call of
an op in a *shape class* races the two: each side runs the call (forward, and backward where
autograd will want one, as training runs it) on the same inputs in the precision in force, timed
after a warm-up, and the faster serves that class from then on. The kernel is kept unless PyTorch is
faster by more than :data:`MARGIN`, so timing noise does not flip a choice back and forth.

- The shape class is the autotuner's: the token count rounded up to a power of two, the widths,
  the dtypes, the op's other arguments, and whether a backward follows.
- Decisions are kept on disk (:func:`decisions_file`, next to the autotuning cache) per GPU, torch
  and triton version and op source; a later process reads them instead of racing again.
- Under ``torch.distributed`` rank 0 decides (from its disk cache or a race) and every rank takes
  its decision, so all ranks run the same code.
- Nothing is raced while ``torch.compile`` traces or a CUDA graph is captured: a decision this
  process made, or read from disk at its first eager call, is used; else the kernel serves (and a
  later eager call races). ``fastgpt.train`` runs one eager step before it compiles the model.
- Under ``torch.use_deterministic_algorithms(True)`` a reference that is not deterministic on a GPU
  (:data:`NONDETERMINISTIC_REFERENCES`) is not a candidate: the kernels are (no atomics).
- The race never runs on CPU tensors (:data:`RACE_DEVICE_TYPES`): Triton's interpreter keeps the
  kernels, and the tests set the device types and a stand-in :func:`time_side`.

:func:`backend_decisions` lists every decision of this process with both timings.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import inspect
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import _io

MARGIN = 0.03  # PyTorch serves only when faster than the kernel by more than this fraction
WARMUP, REPEATS = 2, 10  # untimed calls (compiling, autotuning), then timed ones (the median counts)
RACE_DEVICE_TYPES = ("cuda",)
# PyTorch's attention backward (SDPA's memory-efficient and flash kernels) adds with atomics.
NONDETERMINISTIC_REFERENCES = {"attention": "PyTorch's attention backward is not deterministic on a GPU"}


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which side serves ``op`` in one shape class, and why."""

    op: str
    shape_class: tuple
    served: str  # "kernel" or "torch"
    why: str  # "raced", "read from the disk cache", "rank 0's decision", ...
    kernel_ms: float | None = None  # one call (and its backward), median of REPEATS
    torch_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        """PyTorch's time over the kernel's (above 1: the kernel is faster), where both were timed."""
        if self.kernel_ms is None or self.torch_ms is None or not self.kernel_ms:
            return None
        return self.torch_ms / self.kernel_ms

    def describe(self) -> str:
        side = "the Triton kernel" if self.served == "kernel" else "PyTorch"
        timings = "" if self.speedup is None else (
            f": kernel {self.kernel_ms:.3f} ms, PyTorch {self.torch_ms:.3f} ms ({self.speedup:.2f}x)")
        return f"{self.op} {describe_shape_class(self.shape_class)}: {side} serves ({self.why}){timings}"


_decided: dict[tuple, Decision] = {}


def backend_decisions() -> list[Decision]:
    """Every decision this process made or read, in the order of the calls that needed them."""
    return list(_decided.values())


def forget() -> None:
    """Drop this process's decisions (not the disk cache's): the next call of each class decides
    again, reading the disk cache afresh."""
    global _on_disk
    _decided.clear()
    _on_disk = None


def _bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def shape_class(op: str, args: tuple) -> tuple:
    """``args``' class: per tensor its dtype, token count (all but the last dimension) rounded up to a
    power of two and width; the other arguments as they are; whether a backward follows."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            width = a.shape[-1] if a.dim() else 1
            parts.append((str(a.dtype).removeprefix("torch."), _bucket(a.numel() // max(width, 1)), width))
        else:
            parts.append(a)
    backward = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return (*parts, "backward" if backward else "forward",
            "deterministic" if torch.are_deterministic_algorithms_enabled() else "")


def describe_shape_class(cls: tuple) -> str:
    """A shape class in words: its first tensor's dtype and rows x width (rows rounded up to a power
    of two), the op's other arguments, and whether a backward follows: ``(bfloat16 16384x768, 1e-05, backward)``."""
    tensors = [part for part in cls if isinstance(part, tuple)]
    others = [str(part) for part in cls if not isinstance(part, tuple) and part not in ("", None)]
    first = f"{tensors[0][0]} {tensors[0][1]}x{tensors[0][2]}" if tensors else ""
    return "(" + ", ".join([first, *others] if first else others) + ")"


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def kernel_serves(op: str, args: tuple, kernel: Callable, reference: Callable) -> bool:
    """Whether ``kernel(*args)`` serves this call rather than ``reference(*args)`` (both can run it),
    deciding once per shape class as the module docstring says."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    if device.type not in RACE_DEVICE_TYPES:
        return True
    key = (op, *shape_class(op, args))
    decision = _decided.get(key)
    if decision is None:
        if _tracing():  # no race, no file, no collective: what this process knows (all ranks agree on it)
            decision = None if _distributed() or _on_disk is None else _on_disk.get(key)
            return decision is None or decision.served == "kernel"
        decision = _decided[key] = _decide(key, args, kernel, reference)
    return decision.served == "kernel"


def _decide(key: tuple, args: tuple, kernel: Callable, reference: Callable) -> Decision:
    import torch.distributed as dist

    op = key[0]
    if _distributed() and dist.get_rank() != 0:
        return _receive(key, args)
    if torch.are_deterministic_algorithms_enabled() and op in NONDETERMINISTIC_REFERENCES:
        decision = Decision(op, key[1:], "kernel", f"deterministic algorithms: {NONDETERMINISTIC_REFERENCES[op]}")
    else:
        decision = _disk_decisions().get(key)
        if decision is None:
            decision = _race(key, args, kernel, reference)
            _write_decision(key, decision)
    if _distributed():
        _send(decision, args)
    return decision


# --------------------------------------------------------------------------- the race


def time_side(fn: Callable[[], object], device: torch.device, side: str) -> float:
    """Milliseconds one ``fn()`` takes on ``device``: WARMUP untimed calls, then the median of
    REPEATS (CUDA events on a GPU, the wall clock elsewhere), in an NVTX range named for ``side``
    ("kernel" or "torch") for profilers."""
    cuda = device.type == "cuda"
    with torch.cuda.nvtx.range(f"fastgpt backend race: {side}") if cuda else contextlib.nullcontext():
        for _ in range(WARMUP):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        times = []
        for _ in range(REPEATS):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start_s) * 1e3)
    return sorted(times)[len(times) // 2]


def _training_call(fn: Callable, args: tuple) -> Callable[[], object]:
    """``fn(*args)`` on copies of the tensors (the caller's autograd graph untouched), with the
    backward of every input that needs a gradient when a backward follows."""
    inputs = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    wrt = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]

    def call():
        # Hooks that keep the tensors as they are shadow any outer saved-tensor hooks
        # (torch.utils.checkpoint's, when the call is the first forward of a recomputed block): the
        # race's graph keeps its own tensors. (detach: a pack hook returning its input makes a cycle.)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
            out = fn(*inputs)
            if wrt and torch.is_grad_enabled():
                torch.autograd.grad(out, wrt, torch.ones_like(out))
        return out

    return call


def _race(key: tuple, args: tuple, kernel: Callable, reference: Callable) -> Decision:
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    # The race's own random numbers (dropout) must not move the caller's stream: a run that
    # raced and one that read the decision from disk draw the same masks.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        kernel_ms = time_side(_training_call(kernel, args), device, "kernel")
        torch_ms = time_side(_training_call(reference, args), device, "torch")
    served = "torch" if torch_ms < kernel_ms * (1 - MARGIN) else "kernel"
    return Decision(key[0], key[1:], served, "raced", kernel_ms, torch_ms)


# --------------------------------------------------------------------------- torch.distributed


def _channel(args: tuple) -> torch.Tensor:
    import torch.distributed as dist

    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    return torch.zeros(3, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")


def _send(decision: Decision, args: tuple) -> None:
    import torch.distributed as dist

    message = _channel(args)
    message[0] = 1.0 if decision.served == "torch" else 0.0
    message[1] = math.nan if decision.kernel_ms is None else decision.kernel_ms
    message[2] = math.nan if decision.torch_ms is None else decision.torch_ms
    dist.broadcast(message, src=0)


def _receive(key: tuple, args: tuple) -> Decision:
    import torch.distributed as dist

    message = _channel(args)
    dist.broadcast(message, src=0)
    served, kernel_ms, torch_ms = message.tolist()
    return Decision(key[0], key[1:], "torch" if served else "kernel", "rank 0's decision",
                    None if math.isnan(kernel_ms) else kernel_ms, None if math.isnan(torch_ms) else torch_ms)


# --------------------------------------------------------------------------- the disk cache


def decisions_file() -> Path | None:
    """The file of decisions: one per GPU, torch and triton version, in the kernels' cache directory."""
    import triton

    return _io.cache_file(f"backends-torch-{torch.__version__}-triton-{triton.__version__}")


def _source(op: str) -> str:
    """The hash of the op's kernel module source: a changed kernel races again."""
    module = sys.modules[f"fastgpt_kernels.ops.{op}"]
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:16]


_on_disk: dict[tuple, Decision] | None = None  # the disk cache's decisions, read at the first eager decision


def _valid(key, entry) -> bool:
    return (isinstance(key, tuple) and len(key) > 1 and f"fastgpt_kernels.ops.{key[0]}" in sys.modules
            and isinstance(entry, dict)
            and entry.get("source") == _source(key[0]) and entry.get("served") in ("kernel", "torch")
            and all(isinstance(entry.get(t), (int, float)) for t in ("kernel_ms", "torch_ms")))


def _disk_decisions() -> dict[tuple, Decision]:
    """The disk cache's decisions (an entry of the wrong shape, or of a changed kernel, left out),
    read once per process."""
    global _on_disk
    if _on_disk is None:
        _on_disk = {}
        stored = _io.read_cache(decisions_file())
        for text, entry in (stored.items() if isinstance(stored, dict) else ()):
            try:
                key = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if _valid(key, entry):
                _on_disk[key] = Decision(key[0], key[1:], entry["served"], "read from the disk cache",
                                         entry["kernel_ms"], entry["torch_ms"])
    return _on_disk


def _write_decision(key: tuple, decision: Decision) -> None:
    """Add ``decision`` to the disk cache (what other processes wrote there kept)."""
    path = decisions_file()
    stored = _io.read_cache(path)
    stored = stored if isinstance(stored, dict) else {}
    stored[repr(key)] = {"source": _source(key[0]), "served": decision.served,
                         "kernel_ms": decision.kernel_ms, "torch_ms": decision.torch_ms}
    _io.write_cache(path, stored)
