"""PyTorch versions of every op: the fallback, the test oracle and the benchmark baseline.

Each function has the signature and semantics of the public function of the same name in
:mod:`kernels`, with inputs already validated, except :func:`attention_math`, which spells attention
out step by step as the oracle for the fused versions. This module never imports triton.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``, output in ``x.dtype``."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, T, D) tensors through PyTorch's fused op."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None, dropout_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Attention written out step by step: the oracle the fused versions are tested against.

    Computes in float32 (float64 for float64 inputs) and returns ``q.dtype``. ``dropout_mask`` is a
    boolean keep-mask broadcastable to (B, H, T, T); kept weights are scaled by 1 / (1 - dropout_p).
    Without a mask no dropout is applied, whatever ``dropout_p`` is.
    """
    out_dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    T = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        assert dropout_mask.dtype == torch.bool, "dropout_mask is a boolean keep-mask"
        weights = weights * dropout_mask / (1.0 - dropout_p)
    return (weights @ v).to(out_dtype)  # (B, H, T, D)


def gelu_mlp(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
             proj_bias: torch.Tensor | None) -> torch.Tensor:
    """``proj(gelu_tanh(fc(x)))`` with nn.Linear weight layouts."""
    hidden = F.gelu(F.linear(x, fc_weight, fc_bias), approximate="tanh")  # (..., H)
    return F.linear(hidden, proj_weight, proj_bias)  # (..., C)
