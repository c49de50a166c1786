"""Per-op benchmarks: attention, LayerNorm, the GELU MLP and the lm_head's loss, forward, backward and both, per provider.

Providers (each op is timed with three: its baseline, the reference and Triton; see :func:`providers`):

``naive``      the baseline of attention, LayerNorm and the MLP: what the lecture's model does,
               attention one head at a time through (T, T) score matrices
               (:func:`bench.naive.masked_head_attention`), LayerNorm and the tanh GELU written out
               as separate elementwise ops.
``unfused``    the baseline of ``linear_cross_entropy``: ``F.linear`` then ``F.cross_entropy``, all
               (N, V) logits at once, as plain PyTorch code writes a GPT's loss
               (:func:`fastgpt_kernels.reference.linear_cross_entropy_unfused`).
``reference``  ``fastgpt_kernels.<op>`` under the ``torch`` backend: the PyTorch reference (fastgpt's fallback;
               for the loss, the chunked PyTorch version that never holds all the logits).
``triton``     ``fastgpt_kernels.<op>`` under the ``triton`` backend, only on a CUDA device; on a CPU the row
               says so instead of timing Triton's interpreter.

Work per call, to turn times into rates, from :mod:`fastgpt.perf`: attention counts the FLOPs of
its two matmuls over the causal half of the scores, the MLP those of its two matmuls, the loss
that of the lm_head's matmul (its softmax is a few FLOPs per logit against 2C), twice that
backward; LayerNorm is memory-bound and counts the bytes an ideal kernel moves
(forward reads x and writes y, backward reads x and dy and writes dx).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastgpt_kernels
from bench import measure, train_step
from bench.naive import masked_head_attention
from fastgpt import perf
from fastgpt_kernels import reference, registry

OPS = registry.OPS
PASSES = ("forward", "backward", "forward+backward")
NEEDS_GPU = "needs a CUDA GPU"

# One shape per op and run size, from each op's declaration (``BENCH_SHAPES``): at full size the
# widths are the lecture model's (6 heads of 64, 384 wide, MLP 4x) at context 1024, where the naive
# model's (T, T) matrices dominate; "gpt2" is a GPT-2 124M training step's (batch 16, context 1024,
# 12 heads of 64, 768 wide), for GPUs. The loss always has GPT-2's width and vocabulary.
SHAPES = {size: {op: registry.declaration(op).BENCH_SHAPES[size] for op in OPS}
          for size in ("tiny", "quick", "full", "gpt2")}


def baseline(op: str) -> str | None:
    """The provider fastgpt's op is compared with: ``unfused`` for the loss, ``naive`` for the others
    (None for an op this module has no plain-PyTorch version of: its reference is the baseline)."""
    if op not in _BASELINES:
        return None
    return "unfused" if op == "linear_cross_entropy" else "naive"


def providers(op: str) -> tuple[str, ...]:
    """The providers timed for ``op``: its baseline (where it has one), the reference and Triton."""
    return tuple(p for p in (baseline(op), "reference", "triton") if p is not None)


def timing_dtype(device: torch.device) -> torch.dtype:
    """The dtype the ops are timed in on ``device``: on a GPU, the low precision a training step
    takes there (bfloat16, or float16 on a GPU without it: :func:`bench.train_step.precisions`);
    on a CPU float32."""
    if device.type == "cuda":
        return getattr(torch, train_step.precisions(device)[-1])
    return torch.float32


@dataclass(frozen=True)
class OpCase:
    """One op at one shape and dtype (attention is always causal, as in a GPT)."""

    op: str
    dims: dict
    dtype: torch.dtype = torch.float32

    @property
    def shape_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()


# --------------------------------------------------------------------------- inputs and providers


def make_inputs(case: OpCase, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """The op's arguments from its declaration (``bench_inputs``), the floating ones leaves requiring grad."""
    return registry.declaration(case.op).bench_inputs(case.dims, case.dtype, device, seed)


@functools.lru_cache(maxsize=8)
def _tril(T: int, device: torch.device) -> torch.Tensor:
    """The lecture's mask buffer: made once per length and device, as a registered buffer is."""
    return torch.tril(torch.ones(T, T, device=device))


def naive_attention(q, k, v):
    """(B, H, T, D) causal attention the lecture's way: each head on its own, through (T, T) scores."""
    tril = _tril(q.shape[-2], q.device)
    no_dropout = nn.Identity()
    heads = [masked_head_attention(q[:, h], k[:, h], v[:, h], tril, no_dropout) for h in range(q.shape[1])]
    return torch.stack(heads, dim=1)  # (B, H, T, D)


def naive_layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm as separate elementwise ops: mean, biased variance, normalise, scale, shift."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def naive_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """Linear, the tanh GELU written out as elementwise ops, Linear."""
    h = F.linear(x, fc_weight, fc_bias)
    h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    return F.linear(h, proj_weight, proj_bias)


def unfused_linear_cross_entropy(x, weight, targets):
    """The lm_head and its mean loss as plain PyTorch writes them: every (N, V) logit, then ``F.cross_entropy``."""
    return reference.linear_cross_entropy_unfused(x, weight, None, targets)


_BASELINES = {"attention": naive_attention, "layer_norm": naive_layer_norm, "gelu_mlp": naive_gelu_mlp,
              "linear_cross_entropy": unfused_linear_cross_entropy}
_BACKEND = {"reference": "torch", "triton": "triton"}


def forward(case: OpCase, provider: str, inputs: dict):
    """One forward call of ``case.op`` by ``provider`` (autograd records it)."""
    if provider == baseline(case.op):
        return _BASELINES[case.op](**inputs)
    with fastgpt_kernels.use_backend(_BACKEND[provider]):
        return getattr(fastgpt_kernels, case.op)(**inputs)


@contextlib.contextmanager
def _recorded_launches(op: str):
    """The Triton launches ``fastgpt_kernels.<op>``'s module makes inside the block: its
    module's ``run`` (through which every launch of its plans goes) is wrapped while the block lasts."""
    from fastgpt_kernels import _dispatch

    module = _dispatch.kernel_module(op)
    launched, original = [], module.run

    def run(plan):
        launched.extend(plan[1])
        return original(plan)

    module.run = run
    try:
        yield launched
    finally:
        module.run = original


def launches_kernel(case: OpCase, inputs: dict) -> bool:
    """Whether ``fastgpt_kernels.<op>`` under the ``triton`` backend launches fastgpt's Triton kernels
    rather than anything else (raises KernelUnavailableError if it cannot)."""
    with _recorded_launches(case.op) as launched:
        forward(case, "triton", inputs)
    return bool(launched)


def unavailable(case: OpCase, provider: str, inputs: dict, device: torch.device) -> str | None:
    """Why ``provider`` cannot be timed here, or None. The Triton provider is timed only on a CUDA
    device, and only when it really launches fastgpt's kernel, never the fallback."""
    if provider != "triton":
        return None
    if device.type != "cuda":
        return NEEDS_GPU
    try:
        if not launches_kernel(case, inputs):
            return f"fastgpt_kernels.{case.op} did not launch its Triton kernel"
    except fastgpt_kernels.KernelUnavailableError as exc:
        return str(exc)
    return None


def pass_fns(case: OpCase, provider: str, inputs: dict) -> dict:
    """``{pass: callable}``: forward (recording the graph, as in training); backward of one recorded
    forward (gradients returned, not accumulated); forward then backward. Gradients are taken with
    respect to the inputs that require them (not the loss's targets)."""
    wrt = [t for t in inputs.values() if t.requires_grad]
    out = forward(case, provider, inputs)
    grad_out = torch.randn_like(out)

    def forward_only():
        return forward(case, provider, inputs)

    def backward_only():
        return torch.autograd.grad(out, wrt, grad_out, retain_graph=True)

    def both():
        return torch.autograd.grad(forward(case, provider, inputs), wrt, grad_out)

    return {"forward": forward_only, "backward": backward_only, "forward+backward": both}


# --------------------------------------------------------------------------- work per call


PASS_FACTORS = {"forward": 1, "backward": perf.BACKWARD_FACTOR, "forward+backward": 1 + perf.BACKWARD_FACTOR}


def flops(case: OpCase, pass_name: str) -> float | None:
    """FLOPs one call needs (:mod:`fastgpt.perf`: attention the causal half of the scores, the loss
    its lm_head matmul; None for LayerNorm, which is rated in bytes)."""
    d, factor = case.dims, PASS_FACTORS[pass_name]
    if case.op == "attention":
        return perf.attention_flops(d["B"], d["H"], d["T"], d["D"]) * factor
    if case.op == "gelu_mlp":
        return 2 * perf.matmul_flops(d["M"], d["C"], d["Hd"]) * factor
    if case.op == "linear_cross_entropy":
        return perf.matmul_flops(d["M"], d["C"], d["V"]) * factor
    return None


def ideal_bytes(case: OpCase, pass_name: str) -> float | None:
    """Bytes an ideal LayerNorm moves (None for the compute-bound ops)."""
    if case.op != "layer_norm":
        return None
    tensor = case.dims["M"] * case.dims["N"] * case.itemsize
    return tensor * {"forward": 2, "backward": 3, "forward+backward": 5}[pass_name]


# --------------------------------------------------------------------------- the run


def run(size: str, device: torch.device, dtype: torch.dtype, rounds: int, log=print, iterations: int = 1) -> list[dict]:
    """Time every op, pass and available provider; providers interleaved per (op, pass), each
    round's figure over ``iterations`` calls back to back (:func:`bench.measure.time_call`).

    One row per (op, provider, pass): time (median of ``rounds``), TFLOP/s or GB/s, peak memory, or
    ``status`` saying why it was not measured.
    """
    rows = []
    for op in OPS:
        case = OpCase(op, SHAPES[size][op], dtype)
        inputs = make_inputs(case, device)
        reasons = {p: unavailable(case, p, inputs, device) for p in providers(op)}
        runnable = [p for p in providers(op) if reasons[p] is None]
        fns = {p: pass_fns(case, p, inputs) for p in runnable}
        for pass_name in PASSES:
            log(f"  {op} {pass_name}: {', '.join(runnable)}")
            times = measure.interleaved_times({p: fns[p][pass_name] for p in runnable}, device, rounds,
                                              iterations=iterations)
            for provider in providers(op):
                row = {"op": op, "shape": case.shape_label, "dtype": str(dtype).removeprefix("torch."),
                       "provider": provider, "pass": pass_name}
                if reasons[provider] is not None:
                    rows.append({**row, "status": reasons[provider]})
                    continue
                seconds = measure.median(times[provider])
                work_flops, work_bytes = flops(case, pass_name), ideal_bytes(case, pass_name)
                rows.append({**row, "status": "measured", "time_s": seconds, "rounds": rounds, "iterations": iterations,
                             "tflops": work_flops / seconds / 1e12 if work_flops else None,
                             "gbps": work_bytes / seconds / 1e9 if work_bytes else None,
                             "peak_memory_bytes": measure.peak_memory(fns[provider][pass_name], device)})
        del fns, inputs
    return rows
