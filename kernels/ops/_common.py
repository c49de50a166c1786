"""Host-side helpers that the op modules share."""
from __future__ import annotations

import torch

# Why float32 inputs fall back while TF32 is off (see tf32_enabled).
FLOAT32_NEEDS_TF32 = (
    "float32 inputs while PyTorch's float32 matmuls run in full precision "
    "(torch.backends.cuda.matmul.fp32_precision is not 'tf32'): the kernels' float32 dots run in TF32, "
    "so PyTorch's own ops run these; set torch.backends.cuda.matmul.fp32_precision = 'tf32' (or "
    "torch.set_float32_matmul_precision('high')) to use the kernels")


def run(plan):
    """Launch a plan's kernels in order and return its outputs.

    A plan is ``(outputs, launches)``, each launch ``(kernel, grid, args, meta)``: the op modules
    build plans so that the same launches can be run, compiled ahead of time, or inspected.
    """
    outputs, launches = plan
    for kernel, grid, args, meta in launches:
        kernel[grid](*args, **meta)
    return outputs


# torch.compile cannot trace the flag's getter; the decision it feeds (kernel or PyTorch op, which
# compute the same function) is then fixed when a graph is compiled.
@torch.compiler.assume_constant_result
def tf32_enabled() -> bool:
    """Whether PyTorch's float32 CUDA matmuls use TF32 now.

    The kernels with ``tl.dot`` take float32 inputs only then, and run their dots in TF32 as PyTorch
    would: ``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``allow_tf32 = True`` and
    ``torch.set_float32_matmul_precision("high")`` also set. Otherwise (PyTorch's default: full
    float32) PyTorch's ops run them, exactly as the user asked. Without tensor cores a float32 dot
    in full precision needs the whole tiles in registers: the kernels' tiles would spill.
    """
    return torch.backends.cuda.matmul.fp32_precision == "tf32"
