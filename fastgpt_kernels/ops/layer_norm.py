"""LayerNorm over the last dimension: Triton forward and backward.

Forward, one program per row. A row of up to ``MAX_ONE_BLOCK_N`` elements is held in registers:
one read of x, statistics in fp32 (mean, then the variance of the centred values), one write of y.
Wider rows (any width) are streamed in chunks of ``LOOP_BLOCK_N``: a first pass merges per-chunk
(count, mean, M2) with Chan et al.'s parallel-variance update (no E[x^2] - E[x]^2 cancellation), a
second pass normalises. The mean and 1/std of every row are kept for the backward.

Backward. With xhat = (x - mean) * rstd, y = xhat * w + b and g = dy * w (g = dy without weight),

    dx = rstd * (g - xhat * c1 - c2),  c1 = sum(g * xhat) / N,  c2 = sum(g) / N
    dw = sum over rows of dy * xhat,     db = sum over rows of dy.

Each program of the first backward kernel takes a contiguous group of rows, writes their dx, and
accumulates its own fp32 partial sums of dw and db; a second kernel adds the partial sums of all
programs in a fixed order. No atomics or locks: the result is deterministic run to run.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import as_rows, cdiv, eager_function, next_power_of_2, run, sm_count, traced_or_eager

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ONE_BLOCK_N = 8192  # widest row held in registers; wider rows use the chunked kernels
MIN_BLOCK_N = 128
LOOP_BLOCK_N = 2048
LOOP_NUM_WARPS = 8
MAX_ROWS_PER_PROGRAM = 16  # rows whose dweight/dbias one backward program sums sequentially
# The weight-gradient reduction: each program sums a BLOCK_G x BLOCK_N tile of the partial sums at a
# time, REDUCE_TILE elements, over a column block of REDUCE_MIN_N to REDUCE_MAX_N columns.
REDUCE_TILE, REDUCE_MIN_N, REDUCE_MAX_N, REDUCE_NUM_WARPS = 4096, 32, 128, 4


@triton.jit
def _layer_norm_fwd_kernel(
    X_ptr, Y_ptr, W_ptr, B_ptr, Mean_ptr, Rstd_ptr,
    stride_x_row, stride_y_row, N, eps,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X_ptr += row * stride_x_row
    Y_ptr += row * stride_y_row
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        x = tl.load(X_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W_ptr + cols, mask=mask).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B_ptr + cols, mask=mask).to(tl.float32)
        tl.store(Y_ptr + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    else:
        # Chan et al.: merge each chunk's (count, mean, M2) into the running statistics.
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_chunk = tl.sum(x, axis=0) / n_chunk
            d = tl.where(mask, x - mean_chunk, 0.0)
            total = count + n_chunk
            delta = mean_chunk - mean
            mean = mean + delta * (n_chunk / total)
            m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (count * n_chunk / total)
            count = total
        rstd = tl.rsqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W_ptr + start + cols, mask=mask).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B_ptr + start + cols, mask=mask).to(tl.float32)
            tl.store(Y_ptr + start + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Mean_ptr + row, mean)
    tl.store(Rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_dx_kernel(
    X_ptr, DY_ptr, DX_ptr, W_ptr, Mean_ptr, Rstd_ptr, DW_partial_ptr, DB_partial_ptr,
    stride_x_row, stride_dy_row, stride_dx_row, M, N, rows_per_program,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MAX_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    # This program's own row of the (programs, N) partial-sum buffers.
    partial_row = pid.to(tl.int64) * N
    if ONE_BLOCK:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W_ptr + cols, mask=mask).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            x = tl.load(X_ptr + row64 * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY_ptr + row64 * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean_ptr + row64)
            rstd = tl.load(Rstd_ptr + row64)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w if HAS_WEIGHT else dy
            c1 = tl.sum(xhat * g, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            dx = (g - (xhat * c1 + c2)) * rstd
            tl.store(DX_ptr + row64 * stride_dx_row + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        if HAS_WEIGHT:
            tl.store(DW_partial_ptr + partial_row + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB_partial_ptr + partial_row + cols, db_acc, mask=mask)
    else:
        # Wide rows, in two phases so that the program never reads back what it wrote (a load and a
        # store of one address by different threads would need a barrier): first each row's c1 and
        # c2, kept in registers (one slot per row), then per chunk of columns every row's dx and
        # the chunk's dweight/dbias partial sums, each stored once.
        slots = tl.arange(0, MAX_ROWS)
        c1s = tl.zeros([MAX_ROWS], dtype=tl.float32)
        c2s = tl.zeros([MAX_ROWS], dtype=tl.float32)
        for r in range(0, row_end - row_start):
            row64 = tl.cast(row_start + r, tl.int64)
            mean = tl.load(Mean_ptr + row64)
            rstd = tl.load(Rstd_ptr + row64)
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X_ptr + row64 * stride_x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_ptr + row64 * stride_dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    dy = dy * tl.load(W_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                c1 += tl.sum(xhat * dy, axis=0)
                c2 += tl.sum(dy, axis=0)
            c1s = tl.where(slots == r, c1 / N, c1s)
            c2s = tl.where(slots == r, c2 / N, c2s)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            if HAS_WEIGHT:
                w = tl.load(W_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for r in range(0, row_end - row_start):
                row64 = tl.cast(row_start + r, tl.int64)
                mean = tl.load(Mean_ptr + row64)
                rstd = tl.load(Rstd_ptr + row64)
                c1 = tl.sum(tl.where(slots == r, c1s, 0.0), axis=0)
                c2 = tl.sum(tl.where(slots == r, c2s, 0.0), axis=0)
                x = tl.load(X_ptr + row64 * stride_x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_ptr + row64 * stride_dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy * w if HAS_WEIGHT else dy
                dx = (g - (xhat * c1 + c2)) * rstd
                tl.store(DX_ptr + row64 * stride_dx_row + start + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    dw_acc += dy * xhat
                if HAS_BIAS:
                    db_acc += dy
            if HAS_WEIGHT:
                tl.store(DW_partial_ptr + partial_row + start + cols, dw_acc, mask=mask)
            if HAS_BIAS:
                tl.store(DB_partial_ptr + partial_row + start + cols, db_acc, mask=mask)


@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    DW_partial_ptr, DB_partial_ptr, DW_ptr, DB_ptr, G, N,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        mask = (rows[:, None] < G) & col_mask[None, :]
        if HAS_WEIGHT:
            dw += tl.load(DW_partial_ptr + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_partial_ptr + offsets, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW_ptr + cols, tl.sum(dw, axis=0).to(DW_ptr.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_ptr + cols, tl.sum(db, axis=0).to(DB_ptr.dtype.element_ty), mask=col_mask)


def why_unsupported(x, weight=None, bias=None) -> str | None:
    """Why the kernels cannot take these (already validated) inputs, or None when they can."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the LayerNorm kernels handle float16, bfloat16 and float32"
    return None


def supports(x, weight=None, bias=None) -> bool:
    """Whether the Triton kernels handle these inputs (see :func:`why_unsupported`)."""
    return why_unsupported(x, weight, bias) is None


@functools.lru_cache(maxsize=None)
def block_config(n: int) -> tuple[int, int, bool]:
    """``(BLOCK_N, num_warps, ONE_BLOCK)`` for rows of ``n`` elements: the one launch heuristic."""
    if n <= MAX_ONE_BLOCK_N:
        block = max(MIN_BLOCK_N, next_power_of_2(n))
        return block, min(max(block // 256, 1), 16), True
    return LOOP_BLOCK_N, LOOP_NUM_WARPS, False


def launch_configs() -> list[tuple[int, int, bool]]:
    """Every ``(BLOCK_N, num_warps, ONE_BLOCK)`` that :func:`block_config` can return."""
    one_block = [block_config(1 << k) for k in range(MIN_BLOCK_N.bit_length() - 1, MAX_ONE_BLOCK_N.bit_length())]
    return one_block + [block_config(MAX_ONE_BLOCK_N + 1)]


def backward_programs(m: int, n: int, sms: int | None) -> int:
    """How many programs share the rows in the backward (each keeps an N-wide partial sum).

    Enough to fill a GPU of ``sms`` multiprocessors, and enough that no program adds up more than
    ``MAX_ROWS_PER_PROGRAM`` rows one after another, which bounds the rounding error of each
    sequential fp32 accumulation. The partial-sum buffers then hold at most 1/16 as many floats as
    x has elements. Without a GPU (``sms`` None: Triton's interpreter, which runs programs one
    after another) as few as that allows.
    """
    target = 1 if sms is None else sms * (4 if n <= MAX_ONE_BLOCK_N else 1)
    return max(1, min(m, max(target, cdiv(m, MAX_ROWS_PER_PROGRAM))))


def reduce_block_n(n: int, sms: int | None) -> int:
    """Columns per program of the weight-gradient reduction: as few as fill a GPU of ``sms``
    multiprocessors with programs (a column block each), down to ``REDUCE_MIN_N`` (128-byte rows of
    float32 partial sums); ``REDUCE_MAX_N`` without a GPU (the interpreter: fewer programs)."""
    if sms is None:
        return REDUCE_MAX_N
    return max(REDUCE_MIN_N, min(REDUCE_MAX_N, next_power_of_2(cdiv(n, sms))))


@functools.lru_cache(maxsize=None)
def _forward_meta(n: int, has_weight: bool, has_bias: bool) -> dict:
    block, num_warps, one_block = block_config(n)
    return dict(BLOCK_N=block, ONE_BLOCK=one_block, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, num_warps=num_warps)


def forward_plan(x, weight, bias, eps):
    """Outputs ``(y, mean, rstd)`` for ``x`` (..., N) and the launches that fill them: y of x's
    shape (contiguous), the statistics per row.

    A launch is ``(kernel, grid, args, meta)`` (see :func:`fastgpt_kernels.ops._common.run`).
    """
    n = x.shape[-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    x, m, x_stride, _ = as_rows(x, unit_column_stride=True)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if not m:
        return (y, mean, rstd), []
    args = (x, y, weight, bias, mean, rstd, x_stride, n, n, eps)
    meta = _forward_meta(n, weight is not None, bias is not None)
    return (y, mean, rstd), [(_layer_norm_fwd_kernel, (m,), args, meta)]


def backward_plan(dy, x, weight, has_bias, mean, rstd, sms: int | None = None):
    """Outputs ``(dx, dweight or None, dbias or None)`` for dy and x (..., N), dx of x's shape
    (contiguous), and the launches that fill them.

    ``sms``: the multiprocessors to fill (default: those of x's device; see :func:`backward_programs`).
    """
    n = x.shape[-1]
    has_weight = weight is not None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    x, m, x_stride, _ = as_rows(x, unit_column_stride=True)
    dy, _, dy_stride, _ = as_rows(dy, unit_column_stride=True)
    alloc = torch.zeros if m == 0 else torch.empty  # no rows: the sums are zero, nothing to launch
    dweight = alloc(n, dtype=x.dtype, device=x.device) if has_weight else None
    dbias = alloc(n, dtype=x.dtype, device=x.device) if has_bias else None
    if m == 0:
        return (dx, dweight, dbias), []
    block, num_warps, one_block = block_config(n)
    sms = sm_count(x.device) if sms is None else sms
    rows_per_program = cdiv(m, backward_programs(m, n, sms))
    assert rows_per_program <= MAX_ROWS_PER_PROGRAM
    programs = cdiv(m, rows_per_program)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_weight else None
    db_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_bias else None
    flags = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias)
    launches = [(
        _layer_norm_bwd_dx_kernel, (programs,),
        (x, dy, dx, weight, mean, rstd, dw_partial, db_partial,
         x_stride, dy_stride, n, m, n, rows_per_program),
        dict(BLOCK_N=block, ONE_BLOCK=one_block, MAX_ROWS=MAX_ROWS_PER_PROGRAM, num_warps=num_warps, **flags),
    )]
    if has_weight or has_bias:
        reduce_n = reduce_block_n(n, sms)
        launches.append((
            _layer_norm_bwd_dwdb_kernel, (cdiv(n, reduce_n),),
            (dw_partial, db_partial, dweight, dbias, programs, n),
            dict(BLOCK_G=REDUCE_TILE // reduce_n, BLOCK_N=reduce_n, num_warps=REDUCE_NUM_WARPS, **flags),
        ))
    return (dx, dweight, dbias), launches


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on ``x`` (..., N): ``(y, mean, rstd)``, the statistics per row in float32."""
    return run(forward_plan(x, weight, bias, eps))


def _backward_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; an absent weight or bias gets an empty gradient."""
    dx, dweight, dbias = run(backward_plan(dy, x, weight, has_bias, mean, rstd))
    return dx, x.new_empty(0) if dweight is None else dweight, x.new_empty(0) if dbias is None else dbias


# Registered as custom ops so torch.compile treats the kernels as opaque calls instead of breaking
# the graph on them; autograd is attached to the forward op. Eager calls skip the registration's
# dispatch (see fastgpt_kernels.ops._common.eager_function).
layer_norm_op = torch.library.custom_op("fastgpt::layer_norm", _forward, mutates_args=())
layer_norm_backward_op = torch.library.custom_op("fastgpt::layer_norm_backward", _backward_impl, mutates_args=())


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    n = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(0 if weight is None else n), x.new_empty(n if has_bias else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # y feeds nothing that needs a gradient
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = traced_or_eager(layer_norm_backward_op, _backward_impl)(dy, x, weight, mean, rstd,
                                                                                 ctx.has_bias)
    return dx, None if weight is None else dweight, dbias if ctx.has_bias else None, None


layer_norm_op.register_autograd(_backward, setup_context=_setup_context)
_layer_norm_eager = eager_function(_forward, _setup_context, _backward)


def layer_norm(x, weight, bias, eps):
    """The kernels' LayerNorm with autograd (inputs validated by :func:`fastgpt_kernels.layer_norm`)."""
    return traced_or_eager(layer_norm_op, _layer_norm_eager)(x, weight, bias, eps)[0]
