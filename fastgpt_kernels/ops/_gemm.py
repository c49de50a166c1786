"""Tiled matrix multiplication for the ops whose kernels are GEMMs with fused epilogues.

In the style of Triton's matmul tutorial: one program per (BLOCK_M, BLOCK_N) output tile, programs
ordered in groups of GROUP_M tile rows so that the tiles running together share their operand
panels in L2, fp32 accumulation (TF32 dots for float32 operands), explicit strides for every
operand (a transpose is a stride swap, never a copy), masks on all ragged edges. The op modules
(:mod:`fastgpt_kernels.ops.gelu_mlp`, :mod:`fastgpt_kernels.ops.linear_cross_entropy`) build their kernels from
:func:`tile_start`, :func:`tile_matmul` and :func:`tile_offsets`; :func:`_matmul_kernel` is the
plain GEMM they share (with an optional bias, an accumulating fp32 output, and the row sums of A
that a bias gradient needs).

Offsets inside a tile are int32 (the int64 part of an address is added to the tile's base
pointer), which keeps the address registers of the loads small. A stride so large that a tile's
own offsets pass 2^31 (``needs_wide``) switches them to int64 (``WIDE``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2

GROUP_M = 8  # tile rows per program group (L2 reuse of the B panel)

# The autotuned configs of the GEMM kernels: large tiles for many tokens, a narrower one, small tiles
# (with a deeper K step) for few tokens, where more programs are needed to fill the GPU, and the
# 128 x 128 x 64 tile on 8 warps that Triton's matmul tutorials run on an H100 (BLOCK_K 64 halves
# the K loop's steps; wgmma on sm_90a). Each compiles for sm_80 and sm_90a in every dtype (float32:
# TF32) with no spills and within shared memory (``python -m fastgpt_kernels.tools.compile_report``);
# docs/kernels.md ("Launch configs left out") lists those left out and what the compile report found.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
MAX_BLOCK = max(max(c.kwargs.values()) for c in CONFIGS)


@triton.jit
def tile_start(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(row0, col0)``, the first row and column of this program's output tile.

    Tiles run in groups of GROUP_M tile rows, column by column within a group, so the programs
    running at the same time share the panels of B they read.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def tile_offsets(m_left, n_left, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """Offsets (unit column stride) and mask of a (BLOCK_M, BLOCK_N) tile with m_left rows, n_left columns inside."""
    rm = tl.arange(0, BLOCK_M)[:, None]
    if WIDE:
        rm = rm.to(tl.int64)
    rn = tl.arange(0, BLOCK_N)[None, :]
    return rm * stride_m + rn, (rm < m_left) & (rn < n_left)


@triton.jit
def tile_matmul(A_ptr, B_ptr, m_left, n_left, K, stride_am, stride_ak, stride_bk, stride_bn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_SUMS: tl.constexpr,
                WIDE: tl.constexpr):
    """``(A @ B, A summed over k)`` for one tile, in fp32 (the sums are zero unless ROW_SUMS).

    A_ptr and B_ptr point at the tile's first row of A and first column of B; m_left and n_left
    rows and columns remain from there.
    """
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if WIDE:  # (helpers would be neater, but each call of one costs milliseconds in the interpreter)
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
        rk = rk.to(tl.int64)
    a_k = rk[None, :]
    b_k = rk[:, None]
    row_ok = rm[:, None] < m_left
    col_ok = rn[None, :] < n_left
    a_ptrs = A_ptr + rm[:, None] * stride_am + a_k * stride_ak
    b_ptrs = B_ptr + b_k * stride_bk + rn[None, :] * stride_bn
    if WIDE:
        a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
        b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
    else:
        a_step = BLOCK_K * stride_ak
        b_step = BLOCK_K * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_left = K - k
        a = tl.load(a_ptrs, mask=row_ok & (a_k < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(b_k < k_left) & col_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision="tf32")
        if ROW_SUMS:
            row_sums += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc, row_sums


@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _matmul_kernel(
    A_ptr, B_ptr, Bias_ptr, Out_ptr, RowSum_ptr, M, N, K, TOKENS_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, ROW_SUMS: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Out = A @ B (+ bias), or Out += A @ B with ACCUMULATE; Out has unit column stride.

    With ROW_SUMS the programs of the first tile column also write (or add, with ACCUMULATE) A's
    row sums over k to RowSum: a bias gradient when k runs over the tokens. Out and RowSum are
    read and written by one program per element: no atomics, deterministic. TOKENS_BUCKET only
    keys the autotuner (see :func:`bucket`).
    """
    row0, col0 = tile_start(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_tile = A_ptr + row0.to(tl.int64) * stride_am
    b_tile = B_ptr + col0.to(tl.int64) * stride_bn
    if ROW_SUMS and col0 == 0:
        acc, row_sums = tile_matmul(a_tile, b_tile, M - row0, N - col0, K, stride_am, stride_ak, stride_bk, stride_bn,
                                    BLOCK_M, BLOCK_N, BLOCK_K, True, WIDE)
        rm = tl.arange(0, BLOCK_M)
        sums_ptrs = RowSum_ptr + row0 + rm
        if ACCUMULATE:
            row_sums += tl.load(sums_ptrs, mask=rm < M - row0, other=0.0).to(tl.float32)
        tl.store(sums_ptrs, row_sums.to(RowSum_ptr.dtype.element_ty), mask=rm < M - row0)
    else:
        acc, _ = tile_matmul(a_tile, b_tile, M - row0, N - col0, K, stride_am, stride_ak, stride_bk, stride_bn,
                             BLOCK_M, BLOCK_N, BLOCK_K, False, WIDE)
    if HAS_BIAS:
        rn = tl.arange(0, BLOCK_N)
        acc += tl.load(Bias_ptr + col0 + rn, mask=rn < N - col0, other=0.0).to(tl.float32)[None, :]
    offsets, mask = tile_offsets(M - row0, N - col0, stride_om, BLOCK_M, BLOCK_N, WIDE)
    out_ptrs = Out_ptr + row0.to(tl.int64) * stride_om + col0 + offsets
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=mask)


def wide_strides(*stride_sums: int) -> bool:
    """Whether a tile's own offsets in an operand can pass 2^31, given each operand's row and column
    strides added up: then the GEMM kernels compute them in int64 (``WIDE``)."""
    return max(stride_sums, default=0) * MAX_BLOCK >= 2**31


def needs_wide(*tensors: torch.Tensor | None) -> bool:
    """:func:`wide_strides` of these operands, by the strides of their last two dimensions (those
    of their (rows, columns) view)."""
    return wide_strides(*(sum(t.stride()[-2:]) for t in tensors if t is not None))


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two: the autotuners' key for a token count (TOKENS_BUCKET),
    whichever GEMM dimension the tokens are, so that a run tunes once per shape class instead of
    once per batch shape or prompt length."""
    return next_power_of_2(n)


# Split-K of a weight-gradient GEMM (fastgpt_kernels.ops.gelu_mlp): slices of at least this many tokens, at
# most this many slices, tiles of the largest GEMM config's size counted against the SMs.
SPLIT_MIN_TOKENS = 4096
MAX_SPLIT_K = 8
SPLIT_TILE = 128


def split_k(m: int, n: int, k: int, sms: int | None) -> int:
    """Slices of the reduction of an (m, n) weight gradient over ``k`` tokens on a GPU of ``sms``
    multiprocessors: 1 (no split) where its 128 x 128 tiles make two waves or more, or slices would
    hold fewer than ``SPLIT_MIN_TOKENS`` tokens; else the fewest powers of two (up to
    ``MAX_SPLIT_K``) that make two waves. ``sms`` None (Triton's interpreter): 1.

    Two waves: a GEMM's programs run in waves of one per SM, so 144 tiles on 132 SMs take two waves
    for 1.09 waves of work (55% busy overall); 288 take three for 2.18 (73%).
    """
    if sms is None:
        return 1
    tiles = cdiv(m, SPLIT_TILE) * cdiv(n, SPLIT_TILE)
    split = 1
    while tiles * split < 2 * sms and split < MAX_SPLIT_K and k // (2 * split) >= SPLIT_MIN_TOKENS:
        split *= 2
    return split
