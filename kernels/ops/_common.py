"""Host-side helpers that the op modules share."""
from __future__ import annotations

import torch


def run(plan):
    """Launch a plan's kernels in order and return its outputs.

    A plan is ``(outputs, launches)``, each launch ``(kernel, grid, args, meta)``: the op modules
    build plans so that the same launches can be run, compiled ahead of time, or inspected.
    """
    outputs, launches = plan
    for kernel, grid, args, meta in launches:
        kernel[grid](*args, **meta)
    return outputs


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for the ``tl.dot`` calls of a kernel running in ``dtype``.

    float32 dots use TF32 exactly when PyTorch's own float32 CUDA matmuls would: when
    ``torch.backends.cuda.matmul.fp32_precision`` is "tf32" (which ``allow_tf32 = True`` and
    ``torch.set_float32_matmul_precision("high")`` also set), else full float32 ("ieee"), PyTorch's
    default. 16-bit operands ignore it.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision != "tf32":
        return "ieee"
    return "tf32"
