"""The transformer MLP ``proj(gelu_tanh(fc(x)))`` as Triton GEMMs with fused epilogues, forward and backward.

Every GEMM is a tiled matrix multiply built from :mod:`fastgpt_kernels.ops._gemm` (grouped tile order, fp32
accumulation, explicit strides for every operand, masks on all ragged edges, autotuned block
sizes); the epilogues run on the fp32 accumulator before it is stored. float32 inputs are taken
while PyTorch's float32 matmuls use TF32, and their dots then run in TF32 too.

With x (M, C), fc_weight W1 (H, C), proj_weight W2 (C, H), biases b1 (H,), b2 (C,):

    forward                                        kernel
    pre = x @ W1^T + b1,  act = gelu(pre)          _gelu_mlp_fwd_kernel (GELU): writes act (and pre)
    out = act @ W2^T + b2                          _gelu_mlp_fwd_kernel

GELU is the tanh approximation: gelu(z) = z * (1 + tanh(u)) / 2 with u = sqrt(2/pi) * (z + 0.044715 z^3).
Triton's interpreter has no libdevice tanh, and 1 + tanh(u) cancels for u << 0 anyway, so with
t = exp(-2|u|) in (0, 1] (it never overflows):

    s = (1 + tanh(u)) / 2 = sigmoid(2u) = 1 / (1 + t)  if u >= 0,  t / (1 + t)  otherwise
    s (1 - s) = t / (1 + t)^2                            (no 1 - s cancellation for u >> 0)
    gelu(z) = z * s,   gelu'(z) = s + z * 2 s (1 - s) * du/dz,   du/dz = sqrt(2/pi) * (1 + 3 * 0.044715 z^2).

Backward, with dout (M, C) the gradient of out:

    dpre  = (dout @ W2) * gelu'(pre)               _gelu_mlp_bwd_dpre_kernel (also re-writes act = gelu(pre))
    dW2   = dout^T @ act,   db2 = sum_rows(dout)   _gelu_mlp_bwd_dweight_kernel (+ split reduce)
    dW1   = dpre^T @ x,     db1 = sum_rows(dpre)   _gelu_mlp_bwd_dweight_kernel (+ split reduce)
    dx    = dpre @ W1                              _gelu_mlp_fwd_kernel (no epilogue)

The weight-gradient GEMMs reduce over the M tokens, so a bias gradient is the row sum of their
first operand over the same reduction: the programs of the first tile column add up the tiles
they load anyway. No extra pass over dout or dpre, no atomics, deterministic.

Split-K. A weight gradient is small against its reduction: GPT-2 124M's dW1 is 3072 x 768, 144
tiles of 128 x 128, over 16384 tokens at batch 16, so on a 132-SM GPU it runs as one full wave and
a second of 12 tiles. Where the tiles would fill fewer than two waves
(``fastgpt_kernels.ops._gemm.split_k``), the tokens are cut into SPLIT_K slices: grid axis 1 picks the
slice, each program writes its tile's float32 partial sums (and bias partials) to a workspace,
and _gelu_mlp_bwd_split_reduce_kernel adds the slices up in slice order. No atomics: the result
is the same on every run.

What the forward keeps for the backward, and why. The backward needs gelu'(pre) for dpre and act
for dW2, both (M, H), 4x the size of x. PyTorch's unfused MLP keeps both (linear saves act, gelu
saves pre): 2 M*H elements per layer, the largest activation memory of a GPT block. Choices:

* keep pre and act: 2 M*H elements kept; no extra work.
* keep only pre (chosen): M*H elements kept. act = gelu(pre) is recomputed in the epilogue of the
  dpre GEMM, which loads pre and evaluates s for gelu'(pre) anyway: a few FLOPs per
  element and one extra M*H write (read back by the dW2 GEMM), against a backward that performs
  four GEMMs of 2*M*C*H FLOPs each. The recomputed act is only alive during this layer's backward.
* keep neither and recompute pre = x @ W1^T + b1 in the backward: no M*H kept, but one more GEMM,
  7 instead of 6 per training step (+17% MLP FLOPs). That is activation checkpointing, a
  model-level decision, not the kernel's.

The forward stores pre rounded to x's dtype and computes act = gelu(rounded pre) (the same values
PyTorch's unfused ops produce), so the recomputed act is exactly the forward's. When no gradient is
needed the forward does not write pre at all.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _tuning
from ._common import (FLOAT32_NEEDS_TF32, as_rows, cdiv, eager_function, run, sm_count, tf32_enabled,
                      traced_or_eager)
from ._gemm import CONFIGS, GROUP_M, bucket, split_k, tile_matmul, tile_offsets, tile_start, wide_strides

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Autotuning is keyed on the token count rounded up to a power of two (not the exact count, which
# would tune again for every batch shape and prompt length) and the other two dimensions: the token
# count is M in the forward and dpre GEMMs, K in the weight-gradient GEMMs.
_TOKENS_MN_KEY = ["TOKENS_BUCKET", "N", "K"]
_TOKENS_K_KEY = ["M", "N", "TOKENS_BUCKET"]

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gelu_tanh(z):
    """``(gelu(z), s, s (1 - s))`` with s = (1 + tanh(u)) / 2 (see the module docstring)."""
    # The tensor leads each product: the interpreter cannot multiply a constexpr by a tensor.
    u = z * (z * z * _GELU_CUBIC + 1.0) * _SQRT_2_OVER_PI
    t = tl.exp(tl.abs(u) * -2.0)
    r = 1.0 / (1.0 + t)
    s = tl.where(u >= 0, r, t * r)
    return z * s, s, t * r * r


@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _gelu_mlp_fwd_kernel(
    A_ptr, B_ptr, Bias_ptr, Out_ptr, Pre_ptr, M, N, K, TOKENS_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Out = A @ B (+ bias); with GELU, Out = gelu(pre) and (STORE_PRE) Pre = pre. Out, Pre: unit column stride."""
    row0, col0 = tile_start(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, _ = tile_matmul(A_ptr + row0.to(tl.int64) * stride_am, B_ptr + col0.to(tl.int64) * stride_bn,
                          M - row0, N - col0, K, stride_am, stride_ak, stride_bk, stride_bn,
                          BLOCK_M, BLOCK_N, BLOCK_K, False, WIDE)
    if HAS_BIAS:
        rn = tl.arange(0, BLOCK_N)
        acc += tl.load(Bias_ptr + col0 + rn, mask=rn < N - col0, other=0.0).to(tl.float32)[None, :]
    tile = row0.to(tl.int64) * stride_om + col0
    offsets, mask = tile_offsets(M - row0, N - col0, stride_om, BLOCK_M, BLOCK_N, WIDE)
    if GELU:
        pre = acc.to(Out_ptr.dtype.element_ty)
        if STORE_PRE:
            tl.store(Pre_ptr + tile + offsets, pre, mask=mask)
        acc, _, _ = _gelu_tanh(pre.to(tl.float32))
    tl.store(Out_ptr + tile + offsets, acc.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _gelu_mlp_bwd_dpre_kernel(
    DOut_ptr, W_ptr, Pre_ptr, DPre_ptr, Act_ptr, M, N, K, TOKENS_BUCKET,
    stride_dom, stride_dok, stride_wk, stride_wn, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WIDE: tl.constexpr,
):
    """DPre = (DOut @ W) * gelu'(Pre) and Act = gelu(Pre); Pre, DPre, Act share one layout (unit column stride)."""
    row0, col0 = tile_start(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dact, _ = tile_matmul(DOut_ptr + row0.to(tl.int64) * stride_dom, W_ptr + col0.to(tl.int64) * stride_wn,
                           M - row0, N - col0, K, stride_dom, stride_dok, stride_wk, stride_wn,
                           BLOCK_M, BLOCK_N, BLOCK_K, False, WIDE)
    tile = row0.to(tl.int64) * stride_pm + col0
    # The epilogue in two column halves keeps fewer (BLOCK_M, BLOCK_N) fp32 tensors live at once.
    left, right = tl.split(tl.permute(tl.reshape(dact, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    _dpre_epilogue(left, Pre_ptr + tile, DPre_ptr + tile, Act_ptr + tile, M - row0, N - col0, stride_pm,
                   BLOCK_M, BLOCK_N // 2, WIDE)
    _dpre_epilogue(right, Pre_ptr + tile + BLOCK_N // 2, DPre_ptr + tile + BLOCK_N // 2, Act_ptr + tile + BLOCK_N // 2,
                   M - row0, N - col0 - BLOCK_N // 2, stride_pm, BLOCK_M, BLOCK_N // 2, WIDE)


@triton.jit
def _dpre_epilogue(dact, Pre_ptr, DPre_ptr, Act_ptr, m_left, n_left, stride_pm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    offsets, mask = tile_offsets(m_left, n_left, stride_pm, BLOCK_M, BLOCK_N, WIDE)
    z = tl.load(Pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    act, s, s_1ms = _gelu_tanh(z)
    du_dz = (z * z * (3.0 * _GELU_CUBIC) + 1.0) * _SQRT_2_OVER_PI
    dgelu = s + z * (2.0 * s_1ms) * du_dz
    tl.store(DPre_ptr + offsets, (dact * dgelu).to(DPre_ptr.dtype.element_ty), mask=mask)
    tl.store(Act_ptr + offsets, act.to(Act_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["TOKENS_BUCKET", "SLICE"])
def _gelu_mlp_bwd_dweight_kernel(
    A_ptr, B_ptr, DW_ptr, DBias_ptr, Partial_ptr, M, N, K, TOKENS_BUCKET, SLICE,
    stride_am, stride_ak, stride_bk, stride_bn, stride_dwm,
    BIAS_GRAD: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WIDE: tl.constexpr,
):
    """DW = A @ B, K being the tokens; with BIAS_GRAD, DBias = A summed over K (by the first tile column).

    With SPLIT_K > 1, program (tile, s) covers the s-th of SPLIT_K slices of K (whole BLOCK_K steps)
    and writes its float32 partials to Partial[s] instead: SLICE elements a slice, DW's M x N first
    (row-major), then the M bias sums.
    """
    row0, col0 = tile_start(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_tile = A_ptr + row0.to(tl.int64) * stride_am
    b_tile = B_ptr + col0.to(tl.int64) * stride_bn
    k_len = K
    if SPLIT_K > 1:
        per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k0 = tl.program_id(1) * per_split
        k_len = tl.minimum(K - k0, per_split)  # the last slices may be short or empty
        a_tile += k0.to(tl.int64) * stride_ak
        b_tile += k0.to(tl.int64) * stride_bk
    # (The outputs' addresses are formed after the K loop: nothing more held in registers through it.)
    if BIAS_GRAD and col0 == 0:
        acc, row_sums = tile_matmul(a_tile, b_tile, M - row0, N - col0, k_len, stride_am, stride_ak, stride_bk,
                                     stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, True, WIDE)
        rm = tl.arange(0, BLOCK_M)
        bias_ptrs = DBias_ptr + row0 + rm
        if SPLIT_K > 1:  # the slice ends with the M bias sums
            bias_ptrs = Partial_ptr + tl.program_id(1).to(tl.int64) * SLICE + (SLICE - M) + row0 + rm
        tl.store(bias_ptrs, row_sums.to(bias_ptrs.dtype.element_ty), mask=rm < M - row0)
    else:
        acc, _ = tile_matmul(a_tile, b_tile, M - row0, N - col0, k_len, stride_am, stride_ak, stride_bk,
                              stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, False, WIDE)
    out_ptr = DW_ptr
    if SPLIT_K > 1:
        out_ptr = Partial_ptr + tl.program_id(1).to(tl.int64) * SLICE
        stride_dwm = N
    offsets, mask = tile_offsets(M - row0, N - col0, stride_dwm, BLOCK_M, BLOCK_N, WIDE)
    tl.store(out_ptr + row0.to(tl.int64) * stride_dwm + col0 + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["MN", "SLICE"])
def _gelu_mlp_bwd_split_reduce_kernel(Partial_ptr, DW_ptr, DBias_ptr, MN, SLICE,
                                      SPLIT_K: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """DW (contiguous, MN elements) and DBias: the SPLIT_K slices of Partial added up in slice order."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < SLICE
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(Partial_ptr + split * SLICE.to(tl.int64) + offsets, mask=inside, other=0.0)
    tl.store(DW_ptr + offsets, total.to(DW_ptr.dtype.element_ty), mask=offsets < MN)
    if BIAS_GRAD:
        tl.store(DBias_ptr + (offsets - MN), total.to(DBias_ptr.dtype.element_ty), mask=inside & (offsets >= MN))


_fwd = _tuning.autotuned("gelu_mlp.fwd", _gelu_mlp_fwd_kernel, CONFIGS, _TOKENS_MN_KEY)
_bwd_dpre = _tuning.autotuned("gelu_mlp.dpre", _gelu_mlp_bwd_dpre_kernel, CONFIGS, _TOKENS_MN_KEY)
_bwd_dweight = _tuning.autotuned("gelu_mlp.dweight", _gelu_mlp_bwd_dweight_kernel, CONFIGS, _TOKENS_K_KEY)


def why_unsupported(x, fc_weight, fc_bias=None, proj_weight=None, proj_bias=None) -> str | None:
    """Why the kernels cannot take these (already validated) inputs, or None when they can."""
    named = (("x", x), ("fc_weight", fc_weight), ("fc_bias", fc_bias), ("proj_weight", proj_weight),
             ("proj_bias", proj_bias))
    for name, t in named:
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the GELU MLP kernels handle float16, bfloat16 and float32"
    if x.dtype == torch.float32 and not tf32_enabled():
        return FLOAT32_NEEDS_TF32
    # A bias gradient is summed by the programs of its weight gradient, which an empty weight has none of.
    if 0 in fc_weight.shape:
        return f"fc_weight has shape {tuple(fc_weight.shape)}; the kernels need C >= 1 and a hidden width >= 1"
    return None


SPLIT_REDUCE_BLOCK = 1024  # elements per program of the split-K reduction
# The configs of a weight gradient in K slices: all but 64 x 128 x 32 on 4 warps, which spills there
# (docs/kernels.md, "Launch configs left out").
SPLIT_CONFIGS = tuple(c for c in CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) != (64, 128, 4))


def supports(x, fc_weight, fc_bias=None, proj_weight=None, proj_bias=None) -> bool:
    """Whether the Triton kernels handle these inputs (see :func:`why_unsupported`)."""
    return why_unsupported(x, fc_weight, fc_bias, proj_weight, proj_bias) is None


def _gemm(kernel, m, n, k, operands, strides, meta, split=1, extra_args=()):
    """A launch ``(kernel, grid, args, meta)`` of an (m, n, k) GEMM kernel, or None when its output is empty.

    With k == 0 it still launches: it writes the bias, or zeros. ``split``: the grid's second axis
    (a weight gradient's K slices); ``extra_args`` follow the token bucket.
    """
    if not m or not n:
        return None

    def grid(cfg):
        return (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]), split)

    # The operands' tile offsets: A's and B's by their strides, the outputs' (and pre's, act's) by
    # their row stride and unit column stride; bias offsets stay within a tile.
    stride_am, stride_ak, stride_bk, stride_bn, stride_om = strides
    wide = wide_strides(stride_am + stride_ak, stride_bk + stride_bn, stride_om + 1)
    tokens = k if kernel is _bwd_dweight else m
    key = (bucket(tokens), n, k, str(operands[0].dtype)) if kernel is not _bwd_dweight else \
        (m, n, bucket(tokens), str(operands[0].dtype))
    return _tuning.launch(kernel, grid, (*operands, m, n, k, bucket(tokens), *extra_args, *strides),
                          dict(meta, GROUP_M=GROUP_M, WIDE=wide), key, SPLIT_CONFIGS if split > 1 else None,
                          tokens=tokens)


def _weight_gradient(a, b, dweight, dbias, m, n, k, strides, split):
    """The launches that fill ``dweight`` (m, n), a (m, k) GEMM over k tokens with operands ``a`` and
    ``b``, and ``dbias`` (or None): one, or with ``split`` > 1 the split kernel and its reduction."""
    slice_elements = m * n + (m if dbias is not None else 0)
    # Without a split the kernel writes dweight itself and never touches the workspace argument.
    partials = torch.empty((split, slice_elements), dtype=torch.float32, device=a.device) if split > 1 else dweight
    meta = dict(BIAS_GRAD=dbias is not None, SPLIT_K=split)
    launches = [_gemm(_bwd_dweight, m, n, k, (a, b, dweight, dbias, partials), strides, meta, split,
                      (slice_elements,))]
    if split > 1 and m and n:
        launches.append((_gelu_mlp_bwd_split_reduce_kernel, (cdiv(slice_elements, SPLIT_REDUCE_BLOCK),),
                         (partials, dweight, dbias, m * n, slice_elements),
                         dict(SPLIT_K=split, BIAS_GRAD=dbias is not None, BLOCK=SPLIT_REDUCE_BLOCK)))
    return launches


@functools.lru_cache(maxsize=None)
def _fwd_meta(has_bias: bool, gelu: bool, store_pre: bool) -> dict:
    return dict(HAS_BIAS=has_bias, GELU=gelu, STORE_PRE=store_pre)


def forward_plan(x, fc_weight, fc_bias, proj_weight, proj_bias, keep_pre: bool):
    """Outputs ``(out, pre)`` for ``x`` (..., C) and the two launches that fill them.

    ``out`` has x's shape (contiguous); ``pre`` (rows, H) is empty unless ``keep_pre``. A launch
    is ``(kernel, grid, args, meta)`` (see :func:`fastgpt_kernels.ops._common.run`); the config is chosen
    by :mod:`fastgpt_kernels._tuning`.
    """
    c = x.shape[-1]
    h = fc_weight.shape[0]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    x, m, stride_xm, stride_xk = as_rows(x)
    act = torch.empty((m, h), dtype=x.dtype, device=x.device)
    pre = torch.empty((m, h) if keep_pre else (0,), dtype=x.dtype, device=x.device)
    fc = _gemm(_fwd, m, h, c, (x, fc_weight, fc_bias, act, pre if keep_pre else None),
               (stride_xm, stride_xk, fc_weight.stride(1), fc_weight.stride(0), h),
               _fwd_meta(fc_bias is not None, True, keep_pre))
    proj = _gemm(_fwd, m, c, h, (act, proj_weight, proj_bias, out, None),
                 (h, 1, proj_weight.stride(1), proj_weight.stride(0), c),
                 _fwd_meta(proj_bias is not None, False, False))
    return (out, pre), [launch for launch in (fc, proj) if launch is not None]


def backward_plan(dout, x, fc_weight, proj_weight, pre, has_fc_bias: bool, has_proj_bias: bool,
                  split: int | None = None):
    """Outputs ``(dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias)`` (absent biases: None) and launches,
    for dout and x (..., C) and pre (rows, H); dx has x's shape (contiguous).

    ``split``: the K slices of both weight gradients (default: :func:`~fastgpt_kernels.ops._gemm.split_k` for x's device).
    """
    c = x.shape[-1]
    h = fc_weight.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    x, m, stride_xm, stride_xk = as_rows(x)
    dout, _, stride_dm, stride_dk = as_rows(dout)
    if split is None:
        split = split_k(h, c, m, sm_count(x.device))
    elif isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int, got {split!r}")
    new = dict(dtype=x.dtype, device=x.device)
    dpre = torch.empty((m, h), **new)
    act = torch.empty((m, h), **new)
    dfc_weight = torch.empty((h, c), **new)
    dproj_weight = torch.empty((c, h), **new)
    dfc_bias = torch.empty(h, **new) if has_fc_bias else None
    dproj_bias = torch.empty(c, **new) if has_proj_bias else None
    launches = [
        # dpre = (dout @ W2) * gelu'(pre); act = gelu(pre)
        _gemm(_bwd_dpre, m, h, c, (dout, proj_weight, pre, dpre, act),
              (stride_dm, stride_dk, proj_weight.stride(0), proj_weight.stride(1), pre.stride(0)), {}),
        # dW2 = dout^T @ act, db2 = sum_rows(dout)
        *_weight_gradient(dout, act, dproj_weight, dproj_bias, c, h, m,
                          (stride_dk, stride_dm, h, 1, dproj_weight.stride(0)), split),
        # dW1 = dpre^T @ x, db1 = sum_rows(dpre)
        *_weight_gradient(dpre, x, dfc_weight, dfc_bias, h, c, m,
                          (1, h, stride_xm, stride_xk, dfc_weight.stride(0)), split),
        # dx = dpre @ W1
        _gemm(_fwd, m, c, h, (dpre, fc_weight, None, dx, None),
              (h, 1, fc_weight.stride(0), fc_weight.stride(1), c), _fwd_meta(False, False, False)),
    ]
    return (dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias), [launch for launch in launches if launch is not None]


def _forward(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
             proj_bias: torch.Tensor | None, keep_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on ``x`` (..., C): ``(out, pre)``, pre (rows, H) kept for the backward (empty unless keep_pre)."""
    return run(forward_plan(x, fc_weight, fc_bias, proj_weight, proj_bias, keep_pre))


def _backward_impl(dout: torch.Tensor, x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
                   pre: torch.Tensor, has_fc_bias: bool, has_proj_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias)``; an absent bias gets an empty gradient."""
    dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias = run(
        backward_plan(dout, x, fc_weight, proj_weight, pre, has_fc_bias, has_proj_bias))
    return (dx, dfc_weight, x.new_empty(0) if dfc_bias is None else dfc_bias, dproj_weight,
            x.new_empty(0) if dproj_bias is None else dproj_bias)


# Registered as custom ops so torch.compile treats the kernels as opaque calls instead of breaking
# the graph on them; autograd is attached to the forward op. Eager calls skip the registration's
# dispatch (see fastgpt_kernels.ops._common.eager_function).
gelu_mlp_op = torch.library.custom_op("fastgpt::gelu_mlp", _forward, mutates_args=())
gelu_mlp_backward_op = torch.library.custom_op("fastgpt::gelu_mlp_backward", _backward_impl, mutates_args=())


@gelu_mlp_op.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, keep_pre):
    pre = x.new_empty((x.shape[:-1].numel(), fc_weight.shape[0]) if keep_pre else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), pre


@gelu_mlp_backward_op.register_fake
def _(dout, x, fc_weight, proj_weight, pre, has_fc_bias, has_proj_bias):
    h, c = fc_weight.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format), fc_weight.new_empty(h, c),
            x.new_empty(h if has_fc_bias else 0), proj_weight.new_empty(c, h), x.new_empty(c if has_proj_bias else 0))


def _setup_context(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, proj_bias, keep_pre = inputs
    assert keep_pre, "gelu_mlp_op ran without keep_pre, so it cannot be differentiated"
    ctx.save_for_backward(x, fc_weight, proj_weight, output[1])
    ctx.has_biases = fc_bias is not None, proj_bias is not None


def _backward(ctx, dout, _dpre):
    if dout is None:  # out feeds nothing that needs a gradient
        return None, None, None, None, None, None
    x, fc_weight, proj_weight, pre = ctx.saved_tensors
    has_fc_bias, has_proj_bias = ctx.has_biases
    dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias = traced_or_eager(gelu_mlp_backward_op, _backward_impl)(
        dout, x, fc_weight, proj_weight, pre, has_fc_bias, has_proj_bias)
    return (dx, dfc_weight, dfc_bias if has_fc_bias else None, dproj_weight,
            dproj_bias if has_proj_bias else None, None)


gelu_mlp_op.register_autograd(_backward, setup_context=_setup_context)
_gelu_mlp_eager = eager_function(_forward, _setup_context, _backward)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """The kernels' MLP with autograd (inputs validated by :func:`fastgpt_kernels.gelu_mlp`)."""
    keep_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, fc_weight, fc_bias, proj_weight, proj_bias))
    return traced_or_eager(gelu_mlp_op, _gelu_mlp_eager)(x, fc_weight, fc_bias, proj_weight, proj_bias, keep_pre)[0]
