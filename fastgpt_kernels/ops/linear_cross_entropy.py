"""The language-model head and its loss fused: ``cross_entropy(x @ W^T + b, targets)`` without the (N, V) logits.

With x (N, C), W (V, C), b (V,) and targets t (N,), per row i:

    z_i = W x_i + b                    the logits, accumulated in fp32
    lse_i = log sum_v exp(z_iv)
    loss_i = lse_i - z_{i, t_i}        (0 where t_i == ignore_index)

and the loss is sum_i loss_i / n_valid ("mean"), sum_i loss_i ("sum") or the vector ("none"). With
s_i the output gradient of row i (g / n_valid for "mean", g for "sum", g_i for "none"; 0 for an
ignored row) the gradients are

    dz_iv = (softmax(z_i)_v - [v == t_i]) * s_i
    dx = dz W,   dW = dz^T x,   db = sum_i dz_i.

Rows go in chunks of at most ``MAX_CHUNK_LOGITS / V`` (:func:`fastgpt_kernels.reference.chunk_rows`, the
same chunks as the PyTorch version); per chunk:

1. ``_lce_logits_kernel`` (MODE 0): one program per (rows, vocabulary) tile computes its logits and
   reduces them at once to each row's (max, sum of exp) over the tile, catching the target's logit
   on the way. The logits are never stored.
2. ``_lce_reduce_kernel``: merges a row's (max, sum) pairs over the vocabulary, in fp32, as an
   online softmax does: lse and the loss.
3. ``_lce_logits_kernel`` (MODE 1): the same GEMM again, whose epilogue writes dz (x's dtype) for
   the chunk: the only (rows, V) tensor, of at most ``MAX_CHUNK_LOGITS`` elements.
4. ``_matmul_kernel`` (:mod:`fastgpt_kernels.ops._gemm`): dx = dz W for the chunk; dW += dz^T x and
   db += sum dz, accumulated in fp32 across the chunks.

Recomputing the logits in step 3 costs one GEMM of the four; storing them instead would write and
read back 4 bytes per logit in fp32, which on an H100 takes longer than the GEMM (about 2N.C FLOPs
per logit against 3 passes of 4 bytes), and would triple the chunk's memory.

When the loss is reduced ("mean" or "sum") and a gradient is needed, the forward runs all four steps
with every valid row's s_i = 1, and the backward scales dx, dW and db by the output gradient times
the reduction's factor (1 / n_valid or 1), in float32, rounding once to the inputs' dtypes: the
logits are formed twice per training step. With s_i = g / n_valid in the forward, float16 would flush
most of dz to zero before a GradScaler's scale g reached it (p / n_valid falls below float16's
smallest subnormal, 6e-8, for every p < 6e-8 n_valid), and 65536, GradScaler's default, is inf in
float16; so dW and db stay float32 until scaled when the inputs are float16. With "none" every row
has its own output gradient, so the forward runs steps 1-2 and the backward steps 3-4 (the same
work, split). Everything is deterministic: every
element is written by one program, partial sums are merged in a fixed order, no atomics.

Limits: x, W, b of one dtype (float16, bfloat16, or float32 while PyTorch's float32 matmuls use
TF32); targets int64; any strides (offsets switch to int64 where a stride needs it). On CUDA
tensors a target outside [0, V) that is not ignore_index is not checked (that would synchronise
with the GPU): its loss is NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _tuning, reference
from ._common import FLOAT32_NEEDS_TF32, cdiv, eager_function, run, tf32_enabled, traced_or_eager
from ._gemm import CONFIGS, GROUP_M, _matmul_kernel, bucket, needs_wide, tile_matmul, tile_offsets, tile_start

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCE_BLOCK_M, REDUCE_BLOCK_T = 32, 64  # rows per program and (max, sum) pairs per step of the merge
MODE_LSE, MODE_DLOGITS = 0, 1
SLOT_N = min(c.kwargs["BLOCK_N"] for c in CONFIGS)  # columns per (max, sum) slot: the narrowest tile


@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _lce_logits_kernel(
    X_ptr, W_ptr, Bias_ptr, T_ptr, Max_ptr, Sum_ptr, TLogit_ptr, Lse_ptr, Scale_ptr, DZ_ptr,
    M, N, K, TOKENS_BUCKET, ignore_index,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_t, stride_pm, stride_dzm,
    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, WIDE: tl.constexpr, SLOT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The logits tile z = x W^T + b of rows [row0, row0 + BLOCK_M) and vocabulary [col0, col0 + BLOCK_N).

    MODE 0: Max[row, slot] and Sum[row, slot] = max and sum of exp(z - max) over the tile's valid
    columns, slot = col0 // SLOT_N, and TLogit[row] = z[row, target] by the tile holding the target. MODE 1: DZ[row, v] =
    (exp(z - Lse[row]) - [v == target]) * Scale[row]. M rows, N = V, K = C.
    """
    row0, col0 = tile_start(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    z, _ = tile_matmul(X_ptr + row0.to(tl.int64) * stride_xm, W_ptr + col0.to(tl.int64) * stride_wn,
                       M - row0, N - col0, K, stride_xm, stride_xk, stride_wk, stride_wn,
                       BLOCK_M, BLOCK_N, BLOCK_K, False, WIDE)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    row_ok = rm < M - row0
    col_ok = rn < N - col0
    if HAS_BIAS:
        z += tl.load(Bias_ptr + col0 + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows = row0 + rm
    target = tl.load(T_ptr + rows.to(tl.int64) * stride_t, mask=row_ok, other=ignore_index)
    is_target = (col0 + rn)[None, :] == target[:, None]
    if MODE == 0:
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        tile_sum = tl.sum(tl.exp(z - tile_max[:, None]), axis=1)
        slot = rows.to(tl.int64) * stride_pm + col0 // SLOT_N
        tl.store(Max_ptr + slot, tile_max, mask=row_ok)
        tl.store(Sum_ptr + slot, tile_sum, mask=row_ok)
        target_logit = tl.sum(tl.where(is_target, z, 0.0), axis=1)
        has_target = row_ok & (target >= col0) & (target < col0 + BLOCK_N) & (target < N)
        tl.store(TLogit_ptr + rows, target_logit, mask=has_target)
    else:
        lse = tl.load(Lse_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(Scale_ptr + rows, mask=row_ok, other=0.0)
        dz = (tl.exp(z - lse[:, None]) - tl.where(is_target, 1.0, 0.0)) * scale[:, None]
        offsets, mask = tile_offsets(M - row0, N - col0, stride_dzm, BLOCK_M, BLOCK_N, WIDE)
        tl.store(DZ_ptr + row0.to(tl.int64) * stride_dzm + col0 + offsets, dz.to(DZ_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lce_reduce_kernel(Max_ptr, Sum_ptr, TLogit_ptr, T_ptr, Lse_ptr, Loss_ptr, M, slots, ignore_index,
                       stride_pm, stride_t, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """lse = log sum exp over a row's (max, sum) pairs (merged in slot order) and loss = lse - z[target]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    base = rows.to(tl.int64)[:, None] * stride_pm
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, slots, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (cols[None, :] < slots)
        tile_max = tl.load(Max_ptr + base + cols[None, :], mask=mask, other=float("-inf"))
        tile_sum = tl.load(Sum_ptr + base + cols[None, :], mask=mask, other=0.0)
        new_max = tl.maximum(row_max, tl.max(tile_max, axis=1))
        # exp((-inf) - (-inf)) is NaN: an empty slot (-inf, 0) must add 0, so -inf maxima shift by 0.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        tile_part = tl.where(mask, tile_sum * tl.exp(tile_max - safe_max[:, None]), 0.0)
        row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tile_part, axis=1)
        row_max = new_max
    lse = row_max + tl.log(tl.where(row_ok, row_sum, 1.0))  # (rows past M have nothing to sum)
    target = tl.load(T_ptr + rows.to(tl.int64) * stride_t, mask=row_ok, other=ignore_index)
    ignored = target == ignore_index
    target_logit = tl.load(TLogit_ptr + rows, mask=row_ok & ~ignored, other=0.0)
    tl.store(Lse_ptr + rows, lse, mask=row_ok)
    tl.store(Loss_ptr + rows, tl.where(ignored, 0.0, lse - target_logit), mask=row_ok)


# The 64 x 128 tile on 4 warps holds too many float32 values live in the dz epilogue, so float32
# logits leave it out (docs/kernels.md, "Launch configs left out").
_FLOAT32_LOGITS_CONFIGS = tuple(c for c in CONFIGS if c is not CONFIGS[1])
_LOGITS_CONFIGS = tuple(CONFIGS)


def logits_configs(dtype: torch.dtype) -> tuple:
    """The configs the logits kernel may run with in ``dtype``."""
    return _FLOAT32_LOGITS_CONFIGS if dtype == torch.float32 else _LOGITS_CONFIGS


_LOGITS_KEY = ["TOKENS_BUCKET", "N", "K", "MODE"]
# A tile writes the (max, sum) slot of its first column only; the slots past it in a wide tile keep
# their empty (-inf, 0): a tuning launch restores them after timing configs of other widths.
_logits = _tuning.autotuned("linear_cross_entropy.logits", _lce_logits_kernel, CONFIGS, _LOGITS_KEY,
                            prune=lambda candidates, args: list(logits_configs(args["X_ptr"].dtype)),
                            restore=("Max_ptr", "Sum_ptr"))
_dx = _tuning.autotuned("linear_cross_entropy.dx", _matmul_kernel, CONFIGS, ["TOKENS_BUCKET", "N", "K"])
# dweight (and dbias) accumulate over the chunks of rows: a tuning launch restores them after timing.
# The 128 x 128 x 64 tile spills there in 16-bit dtypes, so it is left out (docs/kernels.md).
DWEIGHT_CONFIGS = tuple(c for c in CONFIGS
                        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) != (128, 128, 64))
_dweight = _tuning.autotuned("linear_cross_entropy.dweight", _matmul_kernel, DWEIGHT_CONFIGS,
                             ["M", "N", "TOKENS_BUCKET"], restore=("Out_ptr", "RowSum_ptr"))


def why_unsupported(x, weight, bias=None, targets=None) -> str | None:
    """Why the kernels cannot take these (already validated) inputs, or None when they can."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the linear cross-entropy kernels handle float16, bfloat16 and float32"
    if x.dtype == torch.float32 and not tf32_enabled():
        return FLOAT32_NEEDS_TF32
    if 0 in weight.shape:
        return f"weight has shape {tuple(weight.shape)}; the kernels need V >= 1 and C >= 1"
    return None


def supports(x, weight, bias=None, targets=None) -> bool:
    """Whether the Triton kernels handle these inputs (see :func:`why_unsupported`)."""
    return why_unsupported(x, weight, bias, targets) is None


def _grid(m: int, n: int):
    return lambda cfg: (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)


def _logits_launch(x, weight, bias, targets, ignore_index, mode, pairs=(None, None), tlogit=None, lse=None,
                   scale=None, dz=None):
    m, k = x.shape
    n = weight.shape[0]
    pair_max, pair_sum = pairs
    meta = dict(HAS_BIAS=bias is not None, MODE=mode, WIDE=needs_wide(x, weight, targets, pair_max, dz),
                SLOT_N=SLOT_N, GROUP_M=GROUP_M)
    args = (x, weight, bias, targets, pair_max, pair_sum, tlogit, lse, scale, dz, m, n, k, bucket(m), ignore_index,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
            0 if pair_max is None else pair_max.stride(0), 0 if dz is None else dz.stride(0))
    return _tuning.launch(_logits, _grid(m, n), args, meta, (bucket(m), n, k, str(x.dtype)), logits_configs(x.dtype),
                          tokens=m)


def loss_plan(x, weight, bias, targets, ignore_index: int):
    """Outputs ``(loss, lse)`` per row (float32) of a chunk ``x`` (rows, C), and the launches that fill them."""
    m, n = x.shape[0], weight.shape[0]
    loss = torch.empty(m, dtype=torch.float32, device=x.device)
    lse = torch.empty(m, dtype=torch.float32, device=x.device)
    if not m:
        return (loss, lse), []
    # One (max, sum) slot per SLOT_N columns, whatever tiling the autotuner picks: a wider tile
    # fills the slot of its first column and leaves the others at (-inf, 0), which add nothing.
    slots = cdiv(n, SLOT_N)
    pair_max = torch.full((m, slots), float("-inf"), dtype=torch.float32, device=x.device)
    pair_sum = torch.zeros((m, slots), dtype=torch.float32, device=x.device)
    # A target outside [0, V) is never caught by a tile: its logit stays NaN, and so does its loss.
    tlogit = torch.full((m,), float("nan"), dtype=torch.float32, device=x.device)
    logits = _logits_launch(x, weight, bias, targets, ignore_index, MODE_LSE, pairs=(pair_max, pair_sum),
                            tlogit=tlogit)
    reduce = (_lce_reduce_kernel, (cdiv(m, REDUCE_BLOCK_M),),
              (pair_max, pair_sum, tlogit, targets, lse, loss, m, slots, ignore_index, pair_max.stride(0),
               targets.stride(0)),
              dict(BLOCK_M=REDUCE_BLOCK_M, BLOCK_T=REDUCE_BLOCK_T, num_warps=4))
    return (loss, lse), [logits, reduce]


def dlogits_plan(x, weight, bias, targets, lse, scale, ignore_index: int):
    """Output dz (rows, V) in x's dtype for a chunk, and the launch that fills it."""
    dz = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    if not dz.numel():
        return dz, []
    return dz, [_logits_launch(x, weight, bias, targets, ignore_index, MODE_DLOGITS, lse=lse, scale=scale, dz=dz)]


def accumulate_plan(dz, x, weight, dx, dweight, dbias):
    """Launches writing dx = dz W for a chunk and adding dz^T x to dweight and sum(dz) to dbias (float32)."""
    m, n = dz.shape
    c = x.shape[1]
    if not m:
        return []
    dx_launch = _tuning.launch(
        _dx, _grid(m, c),
        (dz, weight, None, dx, None, m, c, n, bucket(m), dz.stride(0), dz.stride(1), weight.stride(0),
         weight.stride(1), dx.stride(0)),
        dict(HAS_BIAS=False, ACCUMULATE=False, ROW_SUMS=False, WIDE=needs_wide(dz, weight, dx), GROUP_M=GROUP_M),
        (bucket(m), c, n, str(dz.dtype)), tokens=m)
    dweight_launch = _tuning.launch(
        _dweight, _grid(n, c),
        (dz, x, None, dweight, dbias, n, c, m, bucket(m), dz.stride(1), dz.stride(0), x.stride(0), x.stride(1),
         dweight.stride(0)),
        dict(HAS_BIAS=False, ACCUMULATE=True, ROW_SUMS=dbias is not None, WIDE=needs_wide(dz, x, dweight),
             GROUP_M=GROUP_M), (n, c, bucket(m), str(dz.dtype)), tokens=m)
    return [dx_launch, dweight_launch]


class TritonChunks:
    """One chunk's work for :func:`fastgpt_kernels.reference.linear_cross_entropy_forward` and
    :func:`fastgpt_kernels.reference.linear_cross_entropy_gradients`, by the Triton kernels."""

    @staticmethod
    def loss(x, weight, bias, targets, ignore_index, scale):
        loss, lse = run(loss_plan(x, weight, bias, targets, ignore_index))
        dz = None if scale is None else run(dlogits_plan(x, weight, bias, targets, lse, scale, ignore_index))
        return loss, lse, dz

    @staticmethod
    def dlogits(x, weight, bias, targets, lse, scale, ignore_index):
        return run(dlogits_plan(x, weight, bias, targets, lse, scale, ignore_index))

    @staticmethod
    def accumulate(dz, x, weight, dx, dweight, dbias):
        run((None, accumulate_plan(dz, x, weight, dx, dweight, dbias)))


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, reduction: str, precompute: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, dx, dweight, dbias, factor)`` for x (N, C); the gradients and the reduction's
    factor (see :func:`fastgpt_kernels.reference.linear_cross_entropy_forward`) only when ``precompute``,
    else empty, like an absent bias's."""
    loss, lse, grads = reference.linear_cross_entropy_forward(TritonChunks, x, weight, bias, targets, ignore_index,
                                                                reduction, precompute)
    absent = x.new_empty(0)
    dx, dweight, dbias, factor = grads if grads is not None else (absent, absent.clone(), None, absent.clone())
    return loss, lse, dx, dweight, absent.clone() if dbias is None else dbias, factor


def _backward_impl(dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, lse: torch.Tensor,
                   ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of reduction "none" given the per-row output gradient ``dloss`` (N,)."""
    dx, dweight, dbias = reference.linear_cross_entropy_gradients(TritonChunks, x, weight, bias, targets, lse,
                                                                  dloss, ignore_index)
    return dx, dweight, x.new_empty(0) if dbias is None else dbias


# Registered as custom ops so torch.compile treats the kernels as opaque calls instead of breaking
# the graph on them; autograd is attached to the forward op. Eager calls skip the registration's
# dispatch (see fastgpt_kernels.ops._common.eager_function).
linear_cross_entropy_op = torch.library.custom_op("fastgpt::linear_cross_entropy", _forward, mutates_args=())
linear_cross_entropy_backward_op = torch.library.custom_op("fastgpt::linear_cross_entropy_backward", _backward_impl,
                                                           mutates_args=())


@linear_cross_entropy_op.register_fake
def _(x, weight, bias, targets, ignore_index, reduction, precompute):
    loss = x.new_empty(x.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    lse = x.new_empty(x.shape[:1], dtype=torch.float32)
    kept = reference.precomputed_dtype(x, weight)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if precompute else x.new_empty(0)
    dweight = weight.new_empty(weight.shape, dtype=kept) if precompute else x.new_empty(0)
    dbias = bias.new_empty(bias.shape, dtype=kept) if precompute and bias is not None else x.new_empty(0)
    factor = x.new_empty((), dtype=torch.float32) if precompute else x.new_empty(0)
    return loss, lse, dx, dweight, dbias, factor


@linear_cross_entropy_backward_op.register_fake
def _(dloss, x, weight, bias, targets, lse, ignore_index):
    dbias = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), dbias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, targets, ignore_index, reduction, precompute = inputs
    _, lse, dx, dweight, dbias, factor = output
    ctx.precompute, ctx.has_bias, ctx.ignore_index = precompute, bias is not None, ignore_index
    ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
    if precompute:
        ctx.save_for_backward(dx, dweight, dbias if ctx.has_bias else None, factor)
    else:
        ctx.save_for_backward(x, weight, bias, targets, lse)


def _backward(ctx, dloss, _dlse, _ddx, _ddweight, _ddbias, _dfactor):
    if dloss is None:  # the loss feeds nothing that needs a gradient
        return None, None, None, None, None, None, None
    if ctx.precompute:  # reduced loss: dloss is a scalar that scales the gradients the forward made
        dx, dweight, dbias = reference.scale_gradients(ctx.saved_tensors, dloss, *ctx.dtypes)
    else:
        dx, dweight, dbias = traced_or_eager(linear_cross_entropy_backward_op, _backward_impl)(
            dloss, *ctx.saved_tensors, ctx.ignore_index)
    return dx, dweight, dbias if ctx.has_bias else None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
_linear_cross_entropy_eager = eager_function(_forward, _setup_context, _backward)


def linear_cross_entropy(x, weight, bias, targets, ignore_index: int, reduction: str):
    """The kernels' fused loss with autograd on x (N, C), targets (N,) (validated by
    :func:`fastgpt_kernels.linear_cross_entropy`)."""
    precompute = reduction != "none" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    op = traced_or_eager(linear_cross_entropy_op, _linear_cross_entropy_eager)
    return op(x, weight, bias, targets, ignore_index, reduction, precompute)[0]
