"""fastgpt's fused ops: one short function per op.

Each function validates its inputs, asks :mod:`kernels._dispatch` whether the Triton kernel runs
on them, and calls either the kernel's autograd Function or the PyTorch version in
:mod:`kernels.reference`. Choose the policy with ``FASTGPT_BACKEND=auto|triton|torch``,
:func:`set_backend` or :func:`use_backend`.
"""
from __future__ import annotations

import torch

from . import _checks, _dispatch, reference
from ._dispatch import KernelUnavailableError, get_backend, set_backend, use_backend

__all__ = ["layer_norm", "get_backend", "set_backend", "use_backend", "KernelUnavailableError"]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: (..., N) float16, bfloat16 or float32; any leading dimensions, any strides.
        weight: (N,) of x's dtype and device, or None for no scale.
        bias: (N,) of x's dtype and device, or None (default) for no shift.
        eps: added to the biased variance; finite and >= 0 (default 1e-5).

    Returns:
        (..., N) tensor of x's dtype. Statistics are computed in float32.
    """
    _checks.tensor("x", x)
    _checks.tensor("weight", weight, optional=True)
    _checks.tensor("bias", bias, optional=True)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalise, got shape {tuple(x.shape)}")
    _checks.shape("weight", weight, (x.shape[-1],))
    _checks.shape("bias", bias, (x.shape[-1],))
    _checks.same_device_and_dtype(x=x, weight=weight, bias=bias)
    _checks.finite_nonnegative("eps", eps)
    if _dispatch.use_kernel("layer_norm", x, weight, bias):
        return _dispatch.kernel_module("layer_norm").LayerNormFunction.apply(x, weight, bias, float(eps))
    return reference.layer_norm(x, weight, bias, eps)
