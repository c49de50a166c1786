"""The attention kernels' dropout mask, materialised: for tests and verification only.

The attention kernels never store their (T, T) keep-mask: each program regenerates its tiles from
the call's Philox ``(seed, offset)`` (see :mod:`fastgpt_kernels.ops.attention`). :func:`dropout_mask` writes
the whole mask with the kernels' own ``_dropout_keep``, so that a PyTorch oracle can apply exactly
the mask the kernels applied.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt_kernels.ops.attention import _dropout_keep, _dropout_rng

MASK_BLOCK = 64


@triton.jit
def _attention_dropout_mask_kernel(Keep_ptr, Rng_ptr, H, T_Q, T_K, dropout_p, BLOCK: tl.constexpr):
    """Write the (B, H, T_Q, T_K) keep-mask the attention kernels apply (int8)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(2)
    seed, offset = _dropout_rng(Rng_ptr, True)
    keep = _dropout_keep(seed, offset, bh, rows, tl.program_id(1) * BLOCK, dropout_p, BLOCK, BLOCK)
    ptrs = Keep_ptr + bh.to(tl.int64) * T_Q * T_K + rows[:, None] * T_K + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < T_Q) & (cols[None, :] < T_K))


def mask_launch(keep: torch.Tensor, rng: torch.Tensor, dropout_p: float) -> tuple:
    """The launch ``(kernel, grid, args, meta)`` that fills ``keep`` (B, H, T_Q, T_K) int8."""
    B, H, T_Q, T_K = keep.shape
    grid = (triton.cdiv(T_Q, MASK_BLOCK), triton.cdiv(T_K, MASK_BLOCK), B * H)
    return _attention_dropout_mask_kernel, grid, (keep, rng, H, T_Q, T_K, float(dropout_p)), dict(BLOCK=MASK_BLOCK)


def dropout_mask(rng: torch.Tensor, shape, dropout_p: float, keys: int | None = None) -> torch.Tensor:
    """The boolean keep-mask (B, H, T_Q, T_K) that the kernels apply for ``rng`` (``draw_rng_state``).

    ``shape`` is q's (B, H, T_Q, D); ``keys`` is T_K (default T_Q).
    """
    B, H, T = shape[:3]
    keep = torch.empty((B, H, T, T if keys is None else keys), dtype=torch.int8, device=rng.device)
    if keep.numel():
        kernel, grid, args, meta = mask_launch(keep, rng, dropout_p)
        kernel[grid](*args, **meta)
    return keep.bool()
