"""fastgpt's fused ops: one short function per op.

Each function validates its inputs, asks :mod:`fastgpt_kernels._dispatch` whether the Triton kernel runs
on them, and calls either the kernel (:mod:`fastgpt_kernels.ops`) or the PyTorch version in
:mod:`fastgpt_kernels.reference`. Choose the policy with ``FASTGPT_BACKEND=auto|triton|torch``,
:func:`set_backend` or :func:`use_backend`. Under ``auto`` on a GPU the faster of the two serves each
shape class, timed on its first call: :func:`backend_decisions` lists what was decided. See the autotuner's choices with :func:`tuned_configs`,
and pin the launch configuration of an autotuned kernel (one of :func:`candidate_configs`) with
:func:`use_configs`. The tools that check the kernels (:mod:`fastgpt_kernels.tools`) are not imported here.

Importing the package imports no torch: each public name comes from its module on first
use (:mod:`fastgpt_kernels._lazy`), so corpus preparation uses the package's torch-free helpers
without loading it.
"""
from __future__ import annotations

from ._lazy import lazy_attributes

# Each public name's module; it is imported on first use.
_HOMES = {
    **dict.fromkeys(["layer_norm", "attention", "gelu_mlp", "linear_cross_entropy"], "._api"),
    **dict.fromkeys(["BACKENDS", "get_backend", "set_backend", "use_backend", "KernelUnavailableError"], "._dispatch"),
    **dict.fromkeys(["use_configs", "tuned_configs", "candidate_configs"], "._tuning"),
    **dict.fromkeys(["backend_decisions", "Decision"], "._race"),
}
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
