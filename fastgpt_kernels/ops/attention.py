"""Fused scaled dot-product attention (FlashAttention-2): Triton forward and backward, causal or not,
with dropout on the attention weights.

Forward (Dao, "FlashAttention-2", 2023, algorithm 1). One program per (query tile, head, batch) keeps
its BLOCK_M query rows in registers and streams the keys and values in tiles of BLOCK_N. With the
scores pre-multiplied by ``softmax_scale * log2(e)`` so that exp2 can be used, it keeps per row a
running maximum m and a running sum l of exp2(s - m), rescales the fp32 output accumulator whenever
m grows, and divides by l once at the end. Per row it saves ``lse = m + log2(l)`` (the log-sum-exp
in base 2 of the scaled scores) for the backward. No (T, T) matrix is ever stored.

Causal masking costs only where it matters: key tiles entirely above the diagonal of a query tile
are never visited, tiles entirely below it run without any mask, and only the tiles that cross the
diagonal (or the ragged end of the sequence) are masked.

Dropout keeps each attention weight with probability 1 - p and scales kept weights by 1 / (1 - p).
Whether weight (i, j) of head (b, h) is kept is a pure function of (seed, offset, b * H + h, i, j):
the first output of Philox-4x32-10 keyed by the 64-bit seed on the counter (j, i, b * H + h, offset),
whose top 24 bits, read as a fraction of 2^24, are compared with p. The backward regenerates the
same mask, whatever its tile sizes; nothing of size (T, T) is stored. Every call draws a new
(seed, offset) from torch's generator of the tensors' device (:func:`draw_rng_state`), so a run is
reproducible under ``torch.manual_seed``.

Queries may be fewer than keys (T_Q <= T_K, e.g. new tokens against a cache of keys and values):
query i is then the position T_K - T_Q + i, and causal masking is aligned at the bottom right, as
in FlashAttention.

Limits: q (B, H, T_Q, D) and k, v (B, H, T_K, D) with T_Q <= T_K, D a multiple of 8 up to 128
(padded inside the kernels to the next power of two, at least 16), float16 or bfloat16, or float32
with D up to 64 while PyTorch's float32 matmuls use TF32 (the dots then run in TF32); any strides.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _tuning
from ._common import (FLOAT32_NEEDS_TF32, cdiv, eager_function, next_power_of_2, run, tf32_enabled,
                      traced_or_eager)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
MAX_HEAD_DIM_FP32 = 64  # float32 dK/dV tiles at D = 128 spill on sm_90a
HEAD_DIM_MULTIPLE = 8
MAX_GRID_DIM = 65535  # CUDA's limit on the second and third grid dimensions (heads, batch)
LOG2_E = 1.4426950408889634
PREPROCESS_BLOCK_M = 64

# --------------------------------------------------------------------------- shared device helpers


@triton.jit
def _head(ptr, off_b, off_h, stride_b, stride_h):
    """``ptr`` moved to head ``(off_b, off_h)``, in int64: B * H * T * D elements may exceed 2^31."""
    return ptr + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h


@triton.jit
def _dropout_rng(Rng_ptr, DROPOUT: tl.constexpr):
    """The call's dropout ``(seed, offset)``; zeros, never used, without dropout."""
    if DROPOUT:
        seed = tl.load(Rng_ptr)
        offset = tl.load(Rng_ptr + 1)
    else:
        seed = 0
        offset = 0
    return seed, offset


@triton.jit
def _load_tile(X_ptr, rows, offs_d, stride_t, stride_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """The (rows, BLOCK_D) tile of one head's X; rows >= T (when MASK_ROWS) and padded head-dim columns read as 0."""
    ptrs = X_ptr + rows[:, None] * stride_t + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(X_ptr, value, rows, offs_d, stride_t, stride_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the rows < T and real head-dim columns of a (rows, BLOCK_D) tile of one head's X."""
    ptrs = X_ptr + rows[:, None] * stride_t + offs_d[None, :] * stride_d
    value = value.to(ptrs.dtype.element_ty)
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value, mask=rows[:, None] < T)
    else:
        tl.store(ptrs, value, mask=(rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_keep(seed, offset, bh, rows, start_n, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_N) of head ``bh`` for query ``rows`` and keys start_n .. start_n + BLOCK_N - 1.

    One Philox-4x32-10 call, keyed by ``seed``, on the counter (key // 4, query, head, offset) gives
    the random words of four neighbouring keys: word j % 4 belongs to key j. The top 24 bits of a
    word are a uniform fraction in [0, 1); the weight is kept when it is >= ``dropout_p``.
    ``start_n`` must be a multiple of 4.
    """
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = groups[None, :] + rows[:, None] * 0
    c1 = rows[:, None] + groups[None, :] * 0
    c2 = c0 * 0 + bh
    c3 = (c0 * 0).to(tl.uint32) + offset.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    # k * 2^-24 >= p  <=>  k >= p * 2^24 (exact in float32 for 24-bit k)
    threshold = dropout_p * 16777216.0
    k0 = (r0 >> 8).to(tl.float32) >= threshold
    k1 = (r1 >> 8).to(tl.float32) >= threshold
    k2 = (r2 >> 8).to(tl.float32) >= threshold
    k3 = (r3 >> 8).to(tl.float32) >= threshold
    # (BLOCK_M, BLOCK_N // 4, 2, 2) with [m, g, a, b] = k_(2a + b), i.e. key 4g + 2a + b, row-major.
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), [BLOCK_M, BLOCK_N])


@triton.jit
def _key_range(start_m, T_K, SHIFT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """``(full_end, masked_end)`` of query tile ``start_m``: key tiles in [0, full_end) need no mask,
    those in [full_end, masked_end) do (they cross the diagonal, or the ragged end of the keys);
    causal query i sees the keys up to i + SHIFT."""
    if CAUSAL:
        full_end = (start_m * BLOCK_M + SHIFT) // BLOCK_N * BLOCK_N
        masked_end = tl.minimum((start_m + 1) * BLOCK_M + SHIFT, T_K)
    else:
        full_end = (T_K // BLOCK_N) * BLOCK_N
        masked_end = T_K
    return full_end, masked_end


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K_ptr, V_ptr, stride_k_t, stride_k_d, stride_v_t, stride_v_d,
               offs_m, offs_d, start, end, T_K, SHIFT, qk_scale, seed, offset, bh, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """Fold the key tiles [start, end) into the running (acc, l, m); MASKED tiles apply the masks."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K_ptr, cols, offs_d, stride_k_t, stride_k_d, T_K, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision="tf32") * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            valid = cols[None, :] < T_K
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + SHIFT)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, offset, bh, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        v = _load_tile(V_ptr, cols, offs_d, stride_v_t, stride_v_d, T_K, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="tf32")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, Lse_ptr, Rng_ptr,
    stride_q_b, stride_q_h, stride_q_t, stride_q_d,
    stride_k_b, stride_k_h, stride_k_t, stride_k_d,
    stride_v_b, stride_v_h, stride_v_t, stride_v_d,
    stride_o_b, stride_o_h, stride_o_t, stride_o_d,
    H, T_Q, T_K, T_BUCKET, qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # T_BUCKET only keys the autotuner (query lengths bucketed to powers of two). Query i sits at
    # position i + SHIFT of the keys (the last T_Q of T_K): causal alignment at the bottom right.
    SHIFT = T_K - T_Q
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    bh = off_b * H + off_h
    Q_ptr = _head(Q_ptr, off_b, off_h, stride_q_b, stride_q_h)
    K_ptr = _head(K_ptr, off_b, off_h, stride_k_b, stride_k_h)
    V_ptr = _head(V_ptr, off_b, off_h, stride_v_b, stride_v_h)
    O_ptr = _head(O_ptr, off_b, off_h, stride_o_b, stride_o_h)
    Lse_ptr += bh.to(tl.int64) * T_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q_ptr, offs_m, offs_d, stride_q_t, stride_q_d, T_Q, HEAD_DIM, BLOCK_D, True)
    seed, offset = _dropout_rng(Rng_ptr, DROPOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, masked_end = _key_range(start_m, T_K, SHIFT, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_ptr, V_ptr, stride_k_t, stride_k_d, stride_v_t, stride_v_d,
                               offs_m, offs_d, 0, full_end, T_K, SHIFT, qk_scale, seed, offset, bh, dropout_p,
                               HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, CAUSAL, DROPOUT)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_ptr, V_ptr, stride_k_t, stride_k_d, stride_v_t, stride_v_d,
                               offs_m, offs_d, full_end, masked_end, T_K, SHIFT, qk_scale, seed, offset, bh, dropout_p,
                               HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, DROPOUT)
    l_recip = 1.0 / l_i
    if DROPOUT:
        l_recip = l_recip / (1.0 - dropout_p)
    _store_tile(O_ptr, acc * l_recip[:, None], offs_m, offs_d, stride_o_t, stride_o_d, T_Q, HEAD_DIM, BLOCK_D)
    tl.store(Lse_ptr + offs_m, m_i + tl.log2(l_i), mask=offs_m < T_Q)


# --------------------------------------------------------------------------- backward
#
# With S = softmax_scale * Q K^T, P = softmax(S) row-wise, Z the keep-mask and r = 1 / (1 - p),
# the forward computes O = (P * Z * r) V. Given dO:
#
#     dV = (P * Z * r)^T dO
#     dP = (dO V^T) * Z * r
#     dS = P * (dP - delta),   delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id
#     dQ = softmax_scale * dS K,   dK = softmax_scale * dS^T Q
#
# (delta is a row sum of dO * O because O_i = sum_j P_ij Z_ij r V_j.) P is recomputed from Q, K and
# the saved log-sum-exp: P_ij = exp2(S_ij log2(e) - lse_i). A preprocessing kernel computes delta;
# then one kernel owns a key tile and accumulates its dK and dV over the query tiles, and another owns
# a query tile and accumulates its dQ over the key tiles. Every gradient element is written by exactly
# one program, in a fixed order: no atomics, deterministic results.


@triton.jit
def _attention_bwd_preprocess_kernel(
    O_ptr, DO_ptr, Delta_ptr,
    stride_o_b, stride_o_h, stride_o_t, stride_o_d,
    stride_do_b, stride_do_h, stride_do_t, stride_do_d,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    O_ptr = _head(O_ptr, off_b, off_h, stride_o_b, stride_o_h)
    DO_ptr = _head(DO_ptr, off_b, off_h, stride_do_b, stride_do_h)
    Delta_ptr += (off_b * H + off_h).to(tl.int64) * T_Q
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O_ptr, offs_m, offs_d, stride_o_t, stride_o_d, T_Q,
                   HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load_tile(DO_ptr, offs_m, offs_d, stride_do_t, stride_do_d, T_Q,
                    HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(Delta_ptr + offs_m, tl.sum(o * do, 1), mask=offs_m < T_Q)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, stride_q_t, stride_q_d, stride_do_t, stride_do_d,
                n0, offs_d, start, end, T_Q, SHIFT, qk_scale, seed, offset, bh, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """Add the query tiles [start, end) to the (dK, dV) of the key tile at ``n0``; tiles are (keys, queries)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q_ptr, rows, offs_d, stride_q_t, stride_q_d, T_Q, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_tile(DO_ptr, rows, offs_d, stride_do_t, stride_do_d, T_Q, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(Lse_ptr + rows, mask=rows < T_Q, other=0.0)
            delta = tl.load(Delta_ptr + rows, mask=rows < T_Q, other=0.0)
        else:
            lse = tl.load(Lse_ptr + rows)
            delta = tl.load(Delta_ptr + rows)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision="tf32") * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            valid = rows[None, :] < T_Q
            if CAUSAL:
                valid = valid & (rows[None, :] + SHIFT >= offs_n[:, None])
            p_t = tl.where(valid, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision="tf32")
        if DROPOUT:
            keep = tl.trans(_dropout_keep(seed, offset, bh, rows, n0, dropout_p, BLOCK_M, BLOCK_N))
            dv = tl.dot(tl.where(keep, p_t, 0.0).to(do.dtype), do, dv, input_precision="tf32")
            dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="tf32")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="tf32")
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, DK_ptr, DV_ptr, Lse_ptr, Delta_ptr, Rng_ptr,
    stride_q_b, stride_q_h, stride_q_t, stride_q_d,
    stride_k_b, stride_k_h, stride_k_t, stride_k_d,
    stride_v_b, stride_v_h, stride_v_t, stride_v_d,
    stride_do_b, stride_do_h, stride_do_t, stride_do_d,
    stride_dk_b, stride_dk_h, stride_dk_t, stride_dk_d,
    stride_dv_b, stride_dv_h, stride_dv_t, stride_dv_d,
    H, T_Q, T_K, T_BUCKET, qk_scale, softmax_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    SHIFT = T_K - T_Q
    start_n = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    bh = off_b * H + off_h
    Q_ptr = _head(Q_ptr, off_b, off_h, stride_q_b, stride_q_h)
    K_ptr = _head(K_ptr, off_b, off_h, stride_k_b, stride_k_h)
    V_ptr = _head(V_ptr, off_b, off_h, stride_v_b, stride_v_h)
    DO_ptr = _head(DO_ptr, off_b, off_h, stride_do_b, stride_do_h)
    DK_ptr = _head(DK_ptr, off_b, off_h, stride_dk_b, stride_dk_h)
    DV_ptr = _head(DV_ptr, off_b, off_h, stride_dv_b, stride_dv_h)
    Lse_ptr += bh.to(tl.int64) * T_Q
    Delta_ptr += bh.to(tl.int64) * T_Q

    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K_ptr, offs_n, offs_d, stride_k_t, stride_k_d, T_K, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V_ptr, offs_n, offs_d, stride_v_t, stride_v_d, T_K, HEAD_DIM, BLOCK_D, True)
    seed, offset = _dropout_rng(Rng_ptr, DROPOUT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full_end = (T_Q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query i sees key j when i + SHIFT >= j: query tiles before the key tile's first key see none
        # of it; those up to its last key cross the diagonal; the later ones see all of it.
        diag_start = tl.maximum(n0 - SHIFT, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - SHIFT, 0), BLOCK_M) * BLOCK_M, T_Q)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, stride_q_t, stride_q_d,
                             stride_do_t, stride_do_d, n0, offs_d, diag_start, diag_end, T_Q, SHIFT, qk_scale,
                             seed, offset, bh, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, DROPOUT)
    else:
        diag_end = 0
    tail_start = tl.maximum(diag_end, full_end)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, stride_q_t, stride_q_d,
                         stride_do_t, stride_do_d, n0, offs_d, diag_end, full_end, T_Q, SHIFT, qk_scale,
                         seed, offset, bh, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, CAUSAL, DROPOUT)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q_ptr, DO_ptr, Lse_ptr, Delta_ptr, stride_q_t, stride_q_d,
                         stride_do_t, stride_do_d, n0, offs_d, tail_start, T_Q, T_Q, SHIFT, qk_scale,
                         seed, offset, bh, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, DROPOUT)
    if DROPOUT:
        dv = dv / (1.0 - dropout_p)
    _store_tile(DK_ptr, dk * softmax_scale, offs_n, offs_d, stride_dk_t, stride_dk_d, T_K, HEAD_DIM, BLOCK_D)
    _store_tile(DV_ptr, dv, offs_n, offs_d, stride_dv_t, stride_dv_d, T_K, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K_ptr, V_ptr, stride_k_t, stride_k_d, stride_v_t, stride_v_d,
              offs_m, offs_d, start, end, T_K, SHIFT, qk_scale, seed, offset, bh, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """Add the key tiles [start, end) to the query tile's dQ."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K_ptr, cols, offs_d, stride_k_t, stride_k_d, T_K, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(V_ptr, cols, offs_d, stride_v_t, stride_v_d, T_K, HEAD_DIM, BLOCK_D, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="tf32") * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            valid = cols[None, :] < T_K
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + SHIFT)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="tf32")
        if DROPOUT:
            keep = _dropout_keep(seed, offset, bh, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="tf32")
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, DQ_ptr, Lse_ptr, Delta_ptr, Rng_ptr,
    stride_q_b, stride_q_h, stride_q_t, stride_q_d,
    stride_k_b, stride_k_h, stride_k_t, stride_k_d,
    stride_v_b, stride_v_h, stride_v_t, stride_v_d,
    stride_do_b, stride_do_h, stride_do_t, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_t, stride_dq_d,
    H, T_Q, T_K, T_BUCKET, qk_scale, softmax_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    SHIFT = T_K - T_Q
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    bh = off_b * H + off_h
    Q_ptr = _head(Q_ptr, off_b, off_h, stride_q_b, stride_q_h)
    K_ptr = _head(K_ptr, off_b, off_h, stride_k_b, stride_k_h)
    V_ptr = _head(V_ptr, off_b, off_h, stride_v_b, stride_v_h)
    DO_ptr = _head(DO_ptr, off_b, off_h, stride_do_b, stride_do_h)
    DQ_ptr = _head(DQ_ptr, off_b, off_h, stride_dq_b, stride_dq_h)
    Lse_ptr += bh.to(tl.int64) * T_Q
    Delta_ptr += bh.to(tl.int64) * T_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q_ptr, offs_m, offs_d, stride_q_t, stride_q_d, T_Q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO_ptr, offs_m, offs_d, stride_do_t, stride_do_d, T_Q, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(Lse_ptr + offs_m, mask=offs_m < T_Q, other=0.0)
    delta = tl.load(Delta_ptr + offs_m, mask=offs_m < T_Q, other=0.0)
    seed, offset = _dropout_rng(Rng_ptr, DROPOUT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, masked_end = _key_range(start_m, T_K, SHIFT, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse, delta, K_ptr, V_ptr, stride_k_t, stride_k_d, stride_v_t, stride_v_d,
                   offs_m, offs_d, 0, full_end, T_K, SHIFT, qk_scale, seed, offset, bh, dropout_p,
                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, CAUSAL, DROPOUT)
    dq = _dq_tiles(dq, q, do, lse, delta, K_ptr, V_ptr, stride_k_t, stride_k_d, stride_v_t, stride_v_d,
                   offs_m, offs_d, full_end, masked_end, T_K, SHIFT, qk_scale, seed, offset, bh, dropout_p,
                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, DROPOUT)
    _store_tile(DQ_ptr, dq * softmax_scale, offs_m, offs_d, stride_dq_t, stride_dq_d, T_Q, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------- launch configurations

class Tile(NamedTuple):
    """A launch config and the largest padded head dimension (BLOCK_D) it may run at."""

    config: triton.Config
    max_d: int          # 16-bit inputs
    max_d_fp32: int     # float32 inputs
    max_d_dropout: int  # with dropout: the Philox keep-mask takes registers too
    max_d_dropout_fp32: int | None = None  # float32 with dropout, where lower than both limits above


# The limits keep every config within registers (no spills) and shared memory on sm_80 and sm_90a
# under every supported triton, as checked by ``python -m fastgpt_kernels.tools.compile_report --op
# attention`` (registers differ between triton releases). On sm_90a a tl.dot uses wgmma only when
# its M (the first tile dimension) is at least 64 rows per warpgroup, so every program's own tile
# has at least 64 rows. The forward offers the 128-row tiles of FlashAttention-2 and Triton's
# attention tutorial (128 x 64, 128 x 128); these kernels hold the query tile and the accumulator
# in registers, so they take 8 warps where the tutorial takes 4 (on 4 warps they spill from D = 64,
# as do the tutorial's backward tiles, dK/dV 32 x 128 and dQ 128 x 32, beyond the limits below).
TILES = {
    # BLOCK_M query rows per program, BLOCK_N keys per inner step. A Tile's limits leave out the head
    # dimensions where its config spills (docs/kernels.md, "Launch configs left out"); 64 x 32 and
    # 64 x 64 on 8 warps cover those of 64 x 64 on 4 warps.
    "fwd": [
        Tile(triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3), 64, 32, 32),
        Tile(triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3), 128, 16, 128),
        Tile(triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3), 64, 64, 64),
        Tile(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3), 128, 64, 64, 32),
        Tile(triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3), 64, 64, 16),
    ],
    # BLOCK_N keys per program, BLOCK_M query rows per inner step.
    "dkdv": [
        Tile(triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2), 128, 32, 128),
        Tile(triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2), 64, 32, 64),
        Tile(triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2), 64, 64, 64),
        Tile(triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3), 64, 16, 16),
    ],
    # BLOCK_M query rows per program, BLOCK_N keys per inner step; 64 x 16 covers the cases where
    # 64 x 32 spills (docs/kernels.md).
    "dq": [
        Tile(triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2), 128, 32, 128),
        Tile(triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=2), 64, 64, 64),
        Tile(triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3), 64, 32, 16),
        Tile(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3), 64, 32, 32, 16),
    ],
}
KINDS = tuple(TILES)
MIN_TILE = 64  # tiles up to this size are always allowed; larger ones only when T reaches them


def block_d(head_dim: int) -> int:
    """The head dimension the kernels compute with: the next power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, next_power_of_2(head_dim))


def max_block_d(tile: Tile, dtype: torch.dtype, dropout: bool) -> int:
    """The largest padded head dimension ``tile`` may run at in ``dtype``, with or without dropout."""
    if dtype.itemsize <= 2:
        limit, with_dropout = tile.max_d, tile.max_d_dropout
    else:
        limit = tile.max_d_fp32
        with_dropout = tile.max_d_dropout if tile.max_d_dropout_fp32 is None else tile.max_d_dropout_fp32
    return min(limit, with_dropout) if dropout else limit


def configs(kind: str, head_dim: int, dtype: torch.dtype, seq_len: int, dropout: bool) -> tuple[triton.Config, ...]:
    """The configs of kernel ``kind`` ("fwd", "dkdv" or "dq") that may run on these inputs.

    Configs whose tiles do not fit the padded head dimension (see :func:`max_block_d`) are pruned,
    as are tiles larger than the sequence needs (beyond ``MIN_TILE``). Never empty for inputs the
    kernels support: at worst the first fitting config.
    """
    return _configs(kind, head_dim, dtype, max(MIN_TILE, next_power_of_2(seq_len)), bool(dropout))


@functools.lru_cache(maxsize=None)
def _configs(kind: str, head_dim: int, dtype: torch.dtype, longest: int, dropout: bool) -> tuple[triton.Config, ...]:
    """:func:`configs` for tiles up to ``longest`` (decided once per shape class)."""
    width = block_d(head_dim)
    fitting = [tile.config for tile in TILES[kind] if width <= max_block_d(tile, dtype, dropout)]
    short = tuple(c for c in fitting if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= longest)
    return short or tuple(fitting[:1])


def _autotuned(kind: str, kernel) -> _tuning.Tunable:
    def prune(candidates, args):
        return list(configs(kind, args["HEAD_DIM"], args["Q_ptr"].dtype, args["T_K"], args["DROPOUT"]))

    return _tuning.autotuned(f"attention.{kind}", kernel, [tile.config for tile in TILES[kind]],
                             key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "DROPOUT"], prune=prune)


_attention_fwd = _autotuned("fwd", _attention_fwd_kernel)
_attention_bwd_dkdv = _autotuned("dkdv", _attention_bwd_dkdv_kernel)
_attention_bwd_dq = _autotuned("dq", _attention_bwd_dq_kernel)


# --------------------------------------------------------------------------- host side


def why_unsupported(q, k, v) -> str | None:
    """Why the kernels cannot take these (already validated) inputs, or None: q (B, H, T_Q, D) and
    k, v (B, H, T_K, D) with T_Q <= T_K."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the attention kernels handle float16, bfloat16 and float32"
    if q.dtype == torch.float32 and not tf32_enabled():
        return FLOAT32_NEEDS_TF32
    B, H, T, D = q.shape
    if D > MAX_HEAD_DIM or D % HEAD_DIM_MULTIPLE:
        return (f"head dimension D={D} is not supported; the attention kernels handle multiples of "
                f"{HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}")
    if q.dtype == torch.float32 and D > MAX_HEAD_DIM_FP32:
        return (f"head dimension D={D} in float32 is not supported; the attention kernels take float32 "
                f"up to D={MAX_HEAD_DIM_FP32} (float16 and bfloat16 up to {MAX_HEAD_DIM})")
    if B > MAX_GRID_DIM or H > MAX_GRID_DIM:
        return f"batch {B} or heads {H} exceed the kernels' grid limit of {MAX_GRID_DIM}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if max(t.shape[2] - 1, 0) * t.stride(2) + (D - 1) * t.stride(3) >= 2**31:
            return f"{name} spans 2^31 or more elements within one head; the kernels index a head with int32"
    return None


def supports(q, k, v) -> bool:
    """Whether the Triton kernels handle these inputs (see :func:`why_unsupported`)."""
    return why_unsupported(q, k, v) is None


def draw_rng_state(device) -> torch.Tensor:
    """A fresh dropout ``(seed, offset)``, int64 on ``device``, from torch's generator of that device.

    The seed keys Philox (64 bits); the low 32 bits of the offset are the last counter word.
    """
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def _t_bucket(seq_len: int) -> int:
    return next_power_of_2(seq_len)


def _key(q, k) -> tuple:
    """What a launch's best config depends on, besides the kernel's flags: the lengths' buckets, the
    bucket of batch x heads (how many programs share the GPU's SMs), and the dtype."""
    return _t_bucket(q.shape[2]), _t_bucket(k.shape[2]), next_power_of_2(q.shape[0] * q.shape[1]), str(q.dtype)


def _meta(q, causal: bool, dropout_p: float) -> dict:
    """The constexpr arguments shared by the forward and backward kernels."""
    return _meta_of(q.shape[-1], causal, dropout_p > 0)


@functools.lru_cache(maxsize=None)
def _meta_of(head_dim: int, causal: bool, dropout: bool) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), CAUSAL=causal, DROPOUT=dropout)


@functools.lru_cache(maxsize=None)
def _preprocess_meta(head_dim: int) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=PREPROCESS_BLOCK_M, num_warps=4)


def forward_plan(q, k, v, rng, causal, dropout_p, softmax_scale):
    """Outputs ``(o, lse)`` and the launch ``(kernel, grid, args, meta)`` that fills them."""
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    o = torch.empty_like(q)  # q's dimension order: a (B, T, H, D) layout stays one
    lse = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    if not o.numel():
        return (o, lse), []
    args = (q, k, v, o, lse, rng, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T_Q, T_K, _t_bucket(T_Q), softmax_scale * LOG2_E, dropout_p)
    launch = _tuning.launch(_attention_fwd, lambda c: (cdiv(T_Q, c["BLOCK_M"]), H, B), args,
                            _meta(q, causal, dropout_p), _key(q, k), configs("fwd", D, q.dtype, T_K, dropout_p > 0),
                            tokens=T_Q)
    return (o, lse), [launch]


def preprocess_launch(o, do, delta):
    """The launch that fills ``delta`` (B, H, T_Q) with the row sums of ``do * o``."""
    B, H, T, D = o.shape
    return (_attention_bwd_preprocess_kernel, (cdiv(T, PREPROCESS_BLOCK_M), H, B),
            (o, do, delta, *o.stride(), *do.stride(), H, T), _preprocess_meta(D))


def backward_plan(do, q, k, v, o, lse, rng, causal, dropout_p, softmax_scale):
    """Outputs ``(dq, dk, dv)`` and the launches that fill them: delta, then dK/dV, then dQ."""
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not q.numel():
        return (dq, dk, dv), []
    delta = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    meta = _meta(q, causal, dropout_p)
    lengths = (H, T_Q, T_K, _t_bucket(T_Q), softmax_scale * LOG2_E, softmax_scale, dropout_p)
    dkdv = _tuning.launch(
        _attention_bwd_dkdv, lambda c: (cdiv(T_K, c["BLOCK_N"]), H, B),
        (q, k, v, do, dk, dv, lse, delta, rng, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
         *dk.stride(), *dv.stride(), *lengths),
        meta, _key(q, k), configs("dkdv", D, q.dtype, T_K, dropout_p > 0), tokens=T_Q)
    dq_launch = _tuning.launch(
        _attention_bwd_dq, lambda c: (cdiv(T_Q, c["BLOCK_M"]), H, B),
        (q, k, v, do, dq, lse, delta, rng, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
         *dq.stride(), *lengths),
        meta, _key(q, k), configs("dq", D, q.dtype, T_K, dropout_p > 0), tokens=T_Q)
    return (dq, dk, dv), [preprocess_launch(o, do, delta), dkdv, dq_launch]


# --------------------------------------------------------------------------- autograd and torch.compile

def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rng: torch.Tensor | None, causal: bool,
             dropout_p: float, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(o, lse)``, lse the per-row log-sum-exp (base 2, of the scaled scores) in float32."""
    return run(forward_plan(q, k, v, rng, causal, dropout_p, softmax_scale))


def _backward_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, rng: torch.Tensor | None, causal: bool, dropout_p: float,
                   softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the output gradient and the forward's saved tensors."""
    return run(backward_plan(do, q, k, v, o, lse, rng, causal, dropout_p, softmax_scale))


# Registered as custom ops so torch.compile treats the kernels as opaque calls instead of breaking
# the graph on them; autograd is attached to the forward op. Eager calls skip the registration's
# dispatch (see fastgpt_kernels.ops._common.eager_function).
attention_op = torch.library.custom_op("fastgpt::attention", _forward, mutates_args=())
attention_backward_op = torch.library.custom_op("fastgpt::attention_backward", _backward_impl, mutates_args=())


@attention_op.register_fake
def _(q, k, v, rng, causal, dropout_p, softmax_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, rng, causal, dropout_p, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, rng, causal, dropout_p, softmax_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, rng)
    ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale


def _backward(ctx, do, _dlse):
    if do is None:  # o feeds nothing that needs a gradient
        return None, None, None, None, None, None, None
    q, k, v, o, lse, rng = ctx.saved_tensors
    dq, dk, dv = traced_or_eager(attention_backward_op, _backward_impl)(do, q, k, v, o, lse, rng, ctx.causal,
                                                                         ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)
_attention_eager = eager_function(_forward, _setup_context, _backward)


def attention(q, k, v, causal: bool, dropout_p: float, softmax_scale: float | None):
    """The kernels' attention with autograd (inputs validated by :func:`fastgpt_kernels.attention`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    rng = draw_rng_state(q.device) if dropout_p > 0 else None
    return traced_or_eager(attention_op, _attention_eager)(q, k, v, rng, bool(causal), float(dropout_p), scale)[0]
