"""PyTorch versions of every op: the fallback, the test oracle and the benchmark baseline.

Each function has the signature and semantics of the public function of the same name in
:mod:`fastgpt_kernels`, with inputs already validated, except :func:`attention_math`, which spells attention
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
    """Scaled dot-product attention on (B, H, T_Q, D) queries and (B, H, T_K, D) keys and values through
    PyTorch's fused op; with T_Q < T_K the causal mask is aligned at the bottom right."""
    T_Q, T_K = q.shape[-2], k.shape[-2]
    if causal and T_Q != T_K:  # SDPA's is_causal aligns the mask at the top left
        mask = torch.ones(T_Q, T_K, dtype=torch.bool, device=q.device).tril(diagonal=T_K - T_Q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None, dropout_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Attention written out step by step: the oracle the fused versions are tested against.

    Computes in float32 (float64 for float64 inputs) and returns ``q.dtype``. ``dropout_mask`` is a
    boolean keep-mask broadcastable to (B, H, T_Q, T_K); kept weights are scaled by 1 / (1 - dropout_p).
    Without a mask no dropout is applied, whatever ``dropout_p`` is. With T_Q < T_K the queries are
    the last T_Q positions (causal mask aligned at the bottom right).
    """
    out_dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    T_Q, T_K = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T_Q, T_K)
    if causal:
        future = torch.ones(T_Q, T_K, dtype=torch.bool, device=q.device).triu(diagonal=T_K - T_Q + 1)
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


# --------------------------------------------------------------------------- linear + cross-entropy

# A chunk of rows holds at most this many logits (the (rows, V) gradient of a chunk): 64 M, 128 MiB
# in bfloat16. Large enough that a chunk's GEMMs fill a GPU, small enough that the logits of a
# GPT-2 batch (B·T x 50257) never exist at once.
MAX_CHUNK_LOGITS = 2**26
REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_unfused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), targets, ...)`` on (N, C) rows (float64
    stays float64): what plain PyTorch code computes, holding all (N, V) logits. The oracle and the
    benchmarks' baseline."""
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), targets, ignore_index=ignore_index,
                           reduction=reduction)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss is computed in float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk of the fused linear cross-entropy: at most ``MAX_CHUNK_LOGITS`` logits, at least one row."""
    return max(1, min(n_rows, MAX_CHUNK_LOGITS // max(vocab, 1)))


def _row_chunks(n_rows: int, vocab: int) -> list[slice | None]:
    """The rows of each chunk (:func:`chunk_rows`), or ``[None]`` when one chunk takes them all."""
    step = chunk_rows(n_rows, vocab)
    return [None] if step >= n_rows else [slice(start, start + step) for start in range(0, n_rows, step)]


def _part(t: torch.Tensor | None, rows: slice | None) -> torch.Tensor | None:
    """``t``'s rows of a chunk: ``t`` itself for the only chunk (no slice made)."""
    return t if rows is None or t is None else t[rows]


def _row_scales(targets: torch.Tensor, ignore_index: int, dloss: torch.Tensor | None, dtype):
    """Per-row factor of the logits' gradient (in ``dtype``): dloss (reduction "none"), or 1 for a
    reduced loss, whose reduction factor and output gradient come later (:func:`scale_gradients`);
    0 for ignored rows."""
    valid = (targets != ignore_index).to(dtype)
    return valid if dloss is None else valid * dloss.to(dtype)


def precomputed_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a reduced loss keeps dweight and dbias in until the output gradient (a loss scale)
    reaches them: float32 for float16 inputs, whose range would flush them to zero or infinity before
    they are scaled; the weight's own dtype otherwise."""
    return torch.float32 if x.dtype == torch.float16 else weight.dtype


def scale_gradients(grads, dloss: torch.Tensor, weight_dtype: torch.dtype, bias_dtype: torch.dtype | None):
    """The gradients of a reduced loss: the forward's ``(dx, dweight, dbias, factor)`` (a unit row
    scale, and the reduction's factor, 1 / n_valid or 1) times the output gradient ``dloss``. The
    product is formed in float32 and rounded once to the inputs' dtypes, so a float16 GradScaler's
    scale (65536 is inf in float16) and a mean's 1 / n_valid never meet float16's range apart
    (float64 inputs: in float64)."""
    dx, dweight, dbias, factor = grads
    compute = _loss_dtype(dx.dtype)
    scale = dloss.to(compute) * factor.to(compute)

    def scaled(t, dtype):
        return None if t is None else (t.to(compute) * scale).to(dtype)

    return scaled(dx, dx.dtype), scaled(dweight, weight_dtype), scaled(dbias, bias_dtype)


def linear_cross_entropy_forward(chunks, x, weight, bias, targets, ignore_index: int, reduction: str,
                                 precompute: bool):
    """``(loss, lse, grads)`` of the fused loss on x (N, C) and targets (N,), a chunk of rows at a time.

    ``chunks`` does one chunk's work (:class:`TorchChunks` here, the Triton kernels' in
    :mod:`fastgpt_kernels.ops.linear_cross_entropy`). ``grads`` is ``(dx, dweight, dbias, factor)`` when
    ``precompute`` (a reduced loss), else None: the gradients with every valid row's scale 1 (dx in
    x's dtype, dweight and dbias in :func:`precomputed_dtype`) and the reduction's factor (0-dim,
    float32, or float64 for float64 inputs), which :func:`scale_gradients` applies with the output
    gradient. lse (N,) float32 serves a later backward.
    """
    n = x.shape[0]
    n_valid = (targets != ignore_index).sum()
    scales = _row_scales(targets, ignore_index, None, _loss_dtype(x.dtype)) if precompute else None
    grads = _zero_gradients(x, weight, bias) if precompute else None
    losses, lses = [], []
    for rows in _row_chunks(n, weight.shape[0]):
        chunk_loss, chunk_lse, dz = chunks.loss(_part(x, rows), weight, bias, _part(targets, rows), ignore_index,
                                                _part(scales, rows))
        losses.append(chunk_loss)
        lses.append(chunk_lse)
        if dz is not None:
            chunks.accumulate(dz, _part(x, rows), weight, _part(grads[0], rows), grads[1], grads[2])
    losses, lse = (losses[0], lses[0]) if len(losses) == 1 else (torch.cat(losses), torch.cat(lses))
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum()
        if reduction == "mean":
            loss = loss / n_valid  # 0 / 0 = NaN when everything is ignored, as in PyTorch
    if grads is None:
        return loss, lse, None
    # With every row ignored the gradients are 0 (as PyTorch's), whatever the factor.
    factor = (n_valid.clamp(min=1).to(_loss_dtype(x.dtype)).reciprocal() if reduction == "mean"
              else x.new_ones((), dtype=_loss_dtype(x.dtype)))
    dtype = precomputed_dtype(x, weight)
    dx, dweight, dbias = grads
    return loss, lse, (dx, dweight.to(dtype), None if dbias is None else dbias.to(dtype), factor)


def linear_cross_entropy_gradients(chunks, x, weight, bias, targets, lse, dloss, ignore_index: int):
    """``(dx, dweight, dbias)`` of reduction "none" for the per-row output gradient ``dloss`` (N,),
    from the forward's lse, recomputing the logits a chunk at a time."""
    n = x.shape[0]
    scales = _row_scales(targets, ignore_index, dloss, lse.dtype)
    dx, dweight, dbias = _zero_gradients(x, weight, bias)
    for rows in _row_chunks(n, weight.shape[0]):
        dz = chunks.dlogits(_part(x, rows), weight, bias, _part(targets, rows), _part(lse, rows), _part(scales, rows),
                            ignore_index)
        chunks.accumulate(dz, _part(x, rows), weight, _part(dx, rows), dweight, dbias)
    return dx, dweight.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype)


def _zero_gradients(x, weight, bias):
    """dx in x's dtype (every row written by a chunk), dweight and dbias accumulators at zero (float32,
    or float64 for float64 inputs)."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dweight = torch.zeros(weight.shape, dtype=_loss_dtype(x.dtype), device=x.device)
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=_loss_dtype(x.dtype), device=x.device)
    return dx, dweight, dbias


class TorchChunks:
    """One chunk's work for :func:`linear_cross_entropy_forward` and :func:`linear_cross_entropy_gradients`
    in PyTorch ops: the logits as ``F.linear`` makes them (x's dtype), then float32, as the unfused loss."""

    @staticmethod
    def _logits(x, weight, bias):
        return F.linear(x, weight, bias).to(_loss_dtype(x.dtype))  # (rows, V)

    @staticmethod
    def _softmax_minus_target(logits, lse, targets, scale, ignore_index):
        """dz from the chunk's float32 logits, in place: (exp(z - lse) - onehot(target)) * scale."""
        dz = logits.sub_(lse[:, None]).exp_()
        valid = targets != ignore_index
        rows = torch.arange(len(targets), device=targets.device)[valid]
        dz[rows, targets[valid]] -= 1.0
        return dz.mul_(scale[:, None])

    @staticmethod
    def loss(x, weight, bias, targets, ignore_index, scale):
        logits = TorchChunks._logits(x, weight, bias)
        lse = torch.logsumexp(logits, dim=-1)
        valid = targets != ignore_index
        target_logit = logits.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
        loss = torch.where(valid, lse - target_logit, 0.0)
        if scale is None:
            return loss, lse, None
        return loss, lse, TorchChunks._softmax_minus_target(logits, lse, targets, scale, ignore_index).to(x.dtype)

    @staticmethod
    def dlogits(x, weight, bias, targets, lse, scale, ignore_index):
        logits = TorchChunks._logits(x, weight, bias)
        return TorchChunks._softmax_minus_target(logits, lse, targets, scale, ignore_index).to(x.dtype)

    @staticmethod
    def accumulate(dz, x, weight, dx, dweight, dbias):
        torch.matmul(dz, weight, out=dx)
        dweight += dz.t() @ x
        if dbias is not None:
            dbias += dz.sum(0)


class _LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss with its backward: a reduced loss gets its gradients in the forward, which the
    backward scales; reduction "none" recomputes them in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, reduction):
        precompute = reduction != "none" and any(ctx.needs_input_grad[:3])
        loss, lse, grads = linear_cross_entropy_forward(TorchChunks, x, weight, bias, targets, ignore_index,
                                                        reduction, precompute)
        ctx.precompute, ctx.ignore_index = precompute, ignore_index
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        if precompute:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(x, weight, bias, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.precompute:
            dx, dweight, dbias = scale_gradients(ctx.saved_tensors, dloss, *ctx.dtypes)
        else:
            x, weight, bias, targets, lse = ctx.saved_tensors
            dx, dweight, dbias = linear_cross_entropy_gradients(TorchChunks, x, weight, bias, targets, lse, dloss,
                                                                ctx.ignore_index)
        return dx, dweight, dbias, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """:func:`linear_cross_entropy_unfused`'s function on (N, C) rows, never holding more than
    ``MAX_CHUNK_LOGITS`` logits: the fallback of the Triton kernels."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _LinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, reduction)
    return linear_cross_entropy_forward(TorchChunks, x, weight, bias, targets, ignore_index, reduction, False)[0]
