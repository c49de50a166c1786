"""The ops' public functions, one short function per op, which :mod:`fastgpt_kernels` hands on (its
docstring says what they do); the package imports this module on the first use of one of them."""
from __future__ import annotations

import torch

from . import _checks, _dispatch, reference


def _autocast(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple:
    """The tensors as PyTorch's autocast would hand them to the op they stand for.

    When autocast is on for the first tensor's device type, every tensor is cast to ``dtype``, or
    to the autocast dtype when ``dtype`` is None (matmul-like ops: attention, the MLP); LayerNorm
    passes float32, as CUDA autocast runs layer_norm in float32. Otherwise they are returned as
    they are. As in autocast, float64 tensors are left alone. The casts are differentiable, so
    float32 parameters get float32 gradients.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = dtype or torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in tensors)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: (..., N) float16, bfloat16 or float32; any leading dimensions, any strides.
        weight: (N,) of x's dtype and device, or None for no scale.
        bias: (N,) of x's dtype and device, or None (default) for no shift.
        eps: added to the biased variance; finite and >= 0 (default 1e-5).

    Returns:
        (..., N) tensor of x's dtype (float32 under autocast). Statistics are computed in float32.
    """
    _checks.tensor("x", x)
    _checks.tensor("weight", weight, optional=True)
    _checks.tensor("bias", bias, optional=True)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalise, got shape {tuple(x.shape)}")
    _checks.shape("weight", weight, (x.shape[-1],))
    _checks.shape("bias", bias, (x.shape[-1],))
    x, weight, bias = _autocast(torch.float32, x, weight, bias)
    _checks.same_device_and_dtype(x=x, weight=weight, bias=bias)
    _checks.finite_nonnegative("eps", eps)
    return _dispatch.call("layer_norm", x, weight, bias, float(eps))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention: ``softmax(q @ k^T * softmax_scale [+ causal mask]) @ v``, per head.

    The Triton kernel (fused flash attention, :mod:`fastgpt_kernels.ops.attention`) takes float16 and bfloat16
    with D a multiple of 8 up to 128, and float32 up to D = 64; other inputs use the PyTorch
    reference under ``auto``. Its dropout masks come from torch's random generator of the tensors'
    device.

    Args:
        q: (B, H, T_Q, D) floating tensor; any strides.
        k, v: (B, H, T_K, D) of q's dtype and device, T_K >= T_Q (T_K > T_Q: the queries are the
            last T_Q positions, as for new tokens against a cache of keys and values); any strides.
        causal: if True (default), query i (at position T_K - T_Q + i) attends only to keys at
            positions <= its own: the causal mask is aligned at the bottom right, as in FlashAttention.
        dropout_p: probability of dropping an attention weight, in [0, 1) (default 0.0). Dropout is
            applied whenever ``dropout_p > 0``: pass 0.0 at evaluation time.
        softmax_scale: multiplier of the scores, finite and > 0; None (default) means 1 / sqrt(D).

    Returns:
        (B, H, T_Q, D) tensor of q's dtype (under autocast, of the autocast dtype: inputs are cast).
    """
    _checks.tensor("q", q)
    _checks.tensor("k", k)
    _checks.tensor("v", v)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, H, T, D), got shape {tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a non-empty head dimension D, got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or k.shape[2] < q.shape[2]:
        B, H, T, D = q.shape
        raise ValueError(f"k must have shape ({B}, {H}, T_K, {D}) with T_K >= {T} (q's T), got {tuple(k.shape)}")
    _checks.shape("v", v, k.shape)
    q, k, v = _autocast(None, q, k, v)
    _checks.same_device_and_dtype(q=q, k=k, v=v)
    _checks.probability("dropout_p", dropout_p)
    if softmax_scale is not None:
        _checks.finite_positive("softmax_scale", softmax_scale)
    return _dispatch.call("attention", q, k, v, bool(causal), float(dropout_p), softmax_scale)


def gelu_mlp(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
             proj_bias: torch.Tensor | None) -> torch.Tensor:
    """The transformer MLP ``proj(gelu_tanh(fc(x)))``, weights in ``nn.Linear`` layout.

    The Triton kernels (:mod:`fastgpt_kernels.ops.gelu_mlp`) fuse the biases and GELU into the matrix
    multiplies and take float16, bfloat16 and float32 of any sizes (float32 dots in TF32 exactly
    when PyTorch's float32 matmuls use it: ``torch.backends.cuda.matmul.fp32_precision``).

    Args:
        x: (..., C) floating tensor; any leading dimensions, any strides.
        fc_weight: (Hd, C), the expansion to the hidden width Hd (4 * C in GPT-2).
        fc_bias: (Hd,) or None.
        proj_weight: (C, Hd), the projection back to C.
        proj_bias: (C,) or None.
        All tensors share x's dtype and device.

    Returns:
        (..., C) tensor of x's dtype (under autocast, of the autocast dtype: inputs are cast, as
        ``F.linear`` casts them). GELU is the tanh approximation, as in GPT-2.
    """
    _checks.tensor("x", x)
    _checks.tensor("fc_weight", fc_weight)
    _checks.tensor("fc_bias", fc_bias, optional=True)
    _checks.tensor("proj_weight", proj_weight)
    _checks.tensor("proj_bias", proj_bias, optional=True)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., C), got a 0-d tensor")
    if fc_weight.dim() != 2 or fc_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fc_weight must have shape (hidden, C) with C = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(fc_weight.shape)}")
    hidden, width = fc_weight.shape
    _checks.shape("fc_bias", fc_bias, (hidden,))
    _checks.shape("proj_weight", proj_weight, (width, hidden))
    _checks.shape("proj_bias", proj_bias, (width,))
    x, fc_weight, fc_bias, proj_weight, proj_bias = _autocast(None, x, fc_weight, fc_bias, proj_weight, proj_bias)
    _checks.same_device_and_dtype(x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight,
                                  proj_bias=proj_bias)
    return _dispatch.call("gelu_mlp", x, fc_weight, fc_bias, proj_weight, proj_bias)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits ``x @ weight^T + bias`` against ``targets``, never holding all the logits.

    The same function as ``F.cross_entropy(F.linear(x, weight, bias).float(), targets,
    ignore_index=ignore_index, reduction=reduction)``, the logits accumulated in float32, computed a
    chunk of rows at a time (at most ``fastgpt_kernels.reference.MAX_CHUNK_LOGITS`` logits exist at once)
    by the Triton kernels (:mod:`fastgpt_kernels.ops.linear_cross_entropy`) or, as the fallback, by PyTorch.
    Gradients flow to x, weight and bias.

    Args:
        x: (..., C) float16, bfloat16 or float32; any leading dimensions, any strides.
        weight: (V, C), ``nn.Linear`` / embedding layout (GPT-2 ties it to the token embedding).
        targets: (...) int64 class indices in [0, V), x's leading shape, or ``ignore_index``.
            On CPU tensors an index outside [0, V) raises ValueError naming it; on a GPU it is not
            checked (that would synchronise): the kernels give it a NaN loss.
        bias: (V,) or None (default).
        ignore_index: targets equal to it are left out of the loss and of ``"mean"``'s count
            (default -100, as PyTorch). With every target ignored, "mean" is NaN (as in PyTorch)
            and the gradients are 0.
        reduction: ``"mean"`` (default) over the targets that are not ignored, ``"sum"``, or
            ``"none"`` for the loss of every position.

    Returns:
        A float32 scalar, or with ``"none"`` a float32 tensor of targets' shape (float64 for
        float64 inputs). Under autocast x, weight and bias are cast as ``F.linear`` casts them.
    """
    _checks.tensor("x", x)
    _checks.tensor("weight", weight)
    _checks.tensor("bias", bias, optional=True)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., C), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (V, C) with C = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    _checks.shape("bias", bias, (weight.shape[0],))
    _checks.class_targets("targets", targets, x.shape[:-1], x.device, weight.shape[0], ignore_index)
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, reference.REDUCTIONS))}, got {reduction!r}")
    x, weight, bias = _autocast(None, x, weight, bias)
    _checks.same_device_and_dtype(x=x, weight=weight, bias=bias)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    flat_targets = targets if targets.dim() == 1 else targets.reshape(-1)
    loss = _dispatch.call("linear_cross_entropy", rows, weight, bias, flat_targets, int(ignore_index), reduction)
    return loss.view(targets.shape) if reduction == "none" else loss
