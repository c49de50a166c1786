"""The one place that decides, per call, between a Triton kernel and its PyTorch reference.

Policy (``FASTGPT_BACKEND``, read when this module is imported: on the first use of the package's
ops; or :func:`set_backend` / :func:`use_backend` later):

``auto``   the kernel when Triton is importable, the tensors are on a CUDA device (or Triton's
           interpreter is on and they are CPU tensors) and the op's ``supports(...)`` holds;
           otherwise the reference, with one warning per op and reason when CUDA tensors fall back.
           Where both can run on a CUDA device, the faster serves: the first call of each shape
           class races them (see :mod:`fastgpt_kernels._race`; :func:`backend_decisions` lists the results).
``triton`` the kernel, or :class:`KernelUnavailableError` saying why it cannot run. A benchmark
           that asks for the kernel never times the fallback by accident.
``torch``  always the reference.

Without Triton, or with a Triton older than ``TRITON_FLOOR``, every op runs through the references
and ``NO_TRITON_REASON`` says why.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import warnings

import torch

from . import _race, reference
from .registry import OPS

BACKENDS = ("auto", "triton", "torch")

# The oldest triton the kernels are compiled and checked with (pyproject.toml declares the same).
TRITON_FLOOR = (3, 5)


class KernelUnavailableError(RuntimeError):
    """The ``triton`` backend was requested but the kernel cannot run on these inputs."""


def _check_backend(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _version(text: str) -> tuple[int, ...]:
    """``"3.6.0+git1a2b"`` -> ``(3, 6, 0)``: the leading numeric release of a version string."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def triton_problem(triton_version: str, interpreted: bool, numpy_version: str) -> str | None:
    """Why this triton cannot run the kernels, or None when it can.

    The kernels need triton >= TRITON_FLOOR. Triton's interpreter before 3.7.1 fails on every
    kernel with numpy >= 2.4 (a ``range()`` bound that is a runtime scalar: "only 0-dimensional
    arrays can be converted to Python scalars").
    """
    floor = ".".join(map(str, TRITON_FLOOR))
    if _version(triton_version) < TRITON_FLOOR:
        return (f"triton {triton_version} is older than {floor}, the oldest the kernels support "
                f"(pip install 'triton>={floor}', or a torch whose CUDA build brings it: torch >= 2.9)")
    if interpreted and _version(triton_version) < (3, 7, 1) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run the kernels with numpy {numpy_version} "
                f"(fixed in triton 3.7.1): install numpy < 2.4 or triton >= 3.7.1")
    return None


def _import_kernel_modules():
    """Import Triton and the op modules; ``(modules, interpreted, why_not)``."""
    try:
        import triton
    except ImportError as exc:
        return {}, False, f"triton is not importable ({exc})"
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones are refused below anyway
    # @triton.jit reads this when it decorates, so it is fixed for the life of the modules.
    interpreted = bool(knobs and knobs.runtime.interpret)
    import numpy
    reason = triton_problem(getattr(triton, "__version__", "0"), interpreted, numpy.__version__)
    if reason is not None:
        return {}, interpreted, reason
    return {op: importlib.import_module(f"fastgpt_kernels.ops.{op}") for op in OPS}, interpreted, None


_backend = _check_backend(os.environ.get("FASTGPT_BACKEND", "auto") or "auto")
# INTERPRETED: the kernels run in Triton's interpreter; NO_TRITON_REASON: why Triton is unusable, or None.
_modules, INTERPRETED, NO_TRITON_REASON = _import_kernel_modules()
_warned: set[tuple[str, str]] = set()
# Triton's interpreter keeps a bfloat16 value as its bit pattern in a NumPy uint16 array and computes
# on the integers: silently wrong results. fastgpt_kernels.tools.bf16_shim (verification tooling)
# makes it compute on the values, and sets this when it is installed.
interpreter_computes_bf16 = False
INTERPRETER_BF16_REASON = ("Triton's interpreter computes bfloat16 on its bit patterns (NumPy has no bfloat16), "
                           "so its results would be wrong; fastgpt_kernels.tools.bf16_shim fixes that for verification")


def get_backend() -> str:
    """The current policy: ``"auto"``, ``"triton"`` or ``"torch"``."""
    return _backend


def set_backend(name: str) -> None:
    """Set the policy for every later call (``"auto"``, ``"triton"`` or ``"torch"``)."""
    global _backend
    _backend = _check_backend(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the block under policy ``name``, then restore the previous one."""
    global _backend
    previous, _backend = _backend, _check_backend(name)
    try:
        yield
    finally:
        _backend = previous


def kernel_module(op: str):
    """The module ``fastgpt_kernels.ops.<op>`` holding the op's Triton kernels (raises if Triton cannot run them)."""
    if NO_TRITON_REASON is not None:
        raise KernelUnavailableError(NO_TRITON_REASON)
    return _modules[op]


def _why_not(op: str, tensors) -> str | None:
    if op not in OPS:
        return "this op has no Triton kernel yet"
    if NO_TRITON_REASON is not None:
        return NO_TRITON_REASON
    first = tensors[0]  # the public functions have checked that the tensors share its device
    if not (first.is_cuda or (INTERPRETED and first.is_cpu)):
        return (f"the tensors are on {first.device.type}; the Triton kernels need CUDA tensors "
                f"(or CPU tensors with Triton's interpreter on: TRITON_INTERPRET=1 before import)")
    # (Under autocast the public functions cast before they dispatch: the dtypes here are the kernels'.)
    if first.is_cpu and not interpreter_computes_bf16 and any(t is not None and t.dtype == torch.bfloat16
                                                              for t in tensors):
        return INTERPRETER_BF16_REASON
    return _modules[op].why_unsupported(*tensors)


def use_kernel(op: str, *tensors: torch.Tensor | None) -> bool:
    """Whether ``op`` runs its Triton kernel on these tensors under the current policy.

    ``tensors`` are the op's tensor arguments (``None`` for absent optional ones; the first is
    present), validated to share one device. Raises
    :class:`KernelUnavailableError` under the ``triton`` policy when the kernel cannot run.
    """
    if _backend == "torch":
        return False
    reason = _why_not(op, tensors)
    if reason is None:
        return True
    if _backend == "triton":
        raise KernelUnavailableError(f"fastgpt_kernels.{op}: the Triton kernel cannot run: {reason}")
    if any(t is not None and t.is_cuda for t in tensors) and (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fastgpt_kernels.{op}: using the PyTorch reference: {reason}", RuntimeWarning, stacklevel=3)
    return False


def _tensor_arguments(args: tuple) -> tuple:
    """The leading tensor arguments of an op (None for an absent optional one): what ``supports`` takes."""
    count = 0
    while count < len(args) and (args[count] is None or isinstance(args[count], torch.Tensor)):
        count += 1
    return args[:count]


def call(op: str, *args):
    """Run ``op`` on ``args`` (the arguments its kernel function ``fastgpt_kernels.ops.<op>.<op>`` and
    ``reference.<op>`` share, tensors first) by the side the policy picks: under ``auto`` on a CUDA
    device, the faster one (:mod:`fastgpt_kernels._race`)."""
    if use_kernel(op, *_tensor_arguments(args)):
        kernel = getattr(_modules[op], op)
        if _backend != "auto" or _race.kernel_serves(op, args, kernel, getattr(reference, op)):
            return kernel(*args)
    return getattr(reference, op)(*args)
