"""``python -m fastgpt_kernels.tools.verify``: every Triton kernel against a float64 reference, forward and backward.

For each op, shape and dtype the op's output and every input gradient are computed three ways from
the same inputs: by the Triton kernel (on a GPU, or in Triton's interpreter on CPU tensors), by the
PyTorch reference in the same dtype, and by the PyTorch reference in float64. A tensor passes when

    max|kernel - float64| <= 2 * max|pytorch - float64| + atol,   atol = eps(dtype) * scale

that is, the kernel is at most about twice as far from the exact answer as PyTorch's own op in the
same precision. ``scale`` is max|float64| for most tensors; for a sum over many terms (LayerNorm's
dweight, dbias; attention's output and gradients) it is the largest sum of |terms|, the magnitude
an fp32 accumulation of those terms is rounded at (PyTorch's CPU reductions are more accurate than
fp32 accumulation). float32 is checked with PyTorch's float32 matmuls in TF32, the mode in which the
kernels take float32 (on a GPU their dots then run in TF32: the atol uses TF32's eps). Outputs are
allocated poisoned (NaN), so an element the kernel never writes fails. The command prints one row per
tensor, skips (saying why) the cases the kernels do not take, and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import torch

import fastgpt_kernels
from fastgpt_kernels import _dispatch, reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Check:
    """One compared tensor: the kernel's and PyTorch's max abs error against float64."""

    op: str
    case: str
    dtype: str
    tensor: str
    error: float
    torch_error: float
    bound: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        text = (f"{self.op} {self.case} {self.dtype} {self.tensor}: max abs error {self.error:.3e}, "
                f"PyTorch {self.torch_error:.3e}, bound {self.bound:.3e}: {verdict}")
        return text if self.passed else f"{text} ({self.detail})"


def compare(op: str, case: str, tensor: str, got: torch.Tensor, lowp: torch.Tensor,
            exact: torch.Tensor, scale: float | None = None) -> Check:
    """Compare the kernel's ``got`` and PyTorch's ``lowp`` (same dtype) with the float64 ``exact``.

    ``scale`` sets the atol (eps of the dtype times ``scale``); default max|exact|.
    """
    exact = exact.detach().double().cpu()
    expected_nan = exact.isnan()  # e.g. a mean over no targets: NaN is then the right answer
    err = (got.detach().double().cpu() - exact).abs().masked_fill(expected_nan & got.detach().cpu().isnan(), 0.0)
    torch_err = (lowp.detach().double().cpu() - exact).abs().masked_fill(expected_nan & lowp.detach().cpu().isnan(), 0.0)
    if scale is None:
        scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = 2 * (torch_err.max().item() if torch_err.numel() else 0.0) + torch.finfo(got.dtype).eps * scale
    max_err = err.nan_to_num(float("inf")).max().item() if err.numel() else 0.0
    bad = ~(err <= bound)  # NaN counts as bad
    detail = ""
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        detail = (f"{int(bad.sum())} of {bad.numel()} elements out of bound, first at {first}: "
                  f"got {got.detach().cpu()[first].item():.6g}, expected {exact[first].item():.6g}; "
                  f"mean abs error {err.nan_to_num(float('inf')).mean().item():.3e}")
    return Check(op, case, str(got.dtype).removeprefix("torch."), tensor, max_err,
                 torch_err.max().item() if torch_err.numel() else 0.0, bound, detail)


def assert_pass(checks: list[Check]) -> None:
    """Raise AssertionError listing every failed check (for tests)."""
    assert checks, "nothing was checked"
    failed = [str(c) for c in checks if not c.passed]
    assert not failed, "\n".join(failed)


@contextlib.contextmanager
def poisoned_allocations():
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floating tensors in this block."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def _forward_backward(fn, inputs: dict, make_grad_out, backend: str):
    """Run ``fn(**inputs)`` under ``backend``; return ``{name: tensor}`` for the output and grads."""
    leaves = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    with fastgpt_kernels.use_backend(backend):
        out = fn(**leaves)
    dout = make_grad_out(out)
    wrt = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    with fastgpt_kernels.use_backend(backend):
        grads = torch.autograd.grad(out, [leaves[k] for k in wrt], dout)
    return {"out": out, **{f"d{k}": g for k, g in zip(wrt, grads)}}


def grad_out(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The output gradient used for ``seed``: normal values representable in ``dtype``, on the CPU."""
    gen = torch.Generator().manual_seed(seed + 7919)  # a stream unrelated to the inputs'
    return torch.randn(tuple(shape), generator=gen).to(dtype)


def check_op(op: str, case: str, fn, inputs: dict, seed: int = 0, scales: dict | None = None,
             pytorch_fn=None) -> list[Check]:
    """Compare ``fn`` (a public op of :mod:`fastgpt_kernels`) on the Triton backend against PyTorch.

    ``inputs`` maps argument names to values; tensors with ``requires_grad`` get gradients checked
    (named ``d<name>``). The output gradient is :func:`grad_out`; the float64 run uses the same
    values (inputs and output gradient) upcast. ``scales`` overrides the atol scale per tensor.
    PyTorch's runs call ``fn`` on the ``torch`` backend, or ``pytorch_fn`` when the op's fallback is
    not PyTorch's own op (the fused loss's fallback is itself chunked).
    """
    dtype = next(v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())

    def make_grad_out(out):
        return grad_out(out.shape, dtype, seed).to(device=out.device, dtype=out.dtype)

    exact_inputs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for k, v in inputs.items()}
    with float32_in_tf32():  # the kernels take float32 in TF32 only; PyTorch runs in the same mode
        with poisoned_allocations():
            got = _forward_backward(fn, inputs, make_grad_out, "triton")
        lowp = _forward_backward(pytorch_fn or fn, inputs, make_grad_out, "torch")
    exact = _forward_backward(pytorch_fn or fn, exact_inputs, make_grad_out, "torch")
    scales = scales or {}
    return [compare(op, case, name, got[name], lowp[name], exact[name], scales.get(name)) for name in got]


def _normal(gen: torch.Generator, device, *shape) -> torch.Tensor:
    """Standard normal values from ``gen`` (float32, CPU), or an empty tensor on the ``meta`` device."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta")
    return torch.randn(shape, generator=gen)


def _leaf(t: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()


def layer_norm_inputs(rows, width, dtype, affine=(True, True), *, device="cpu", view=None, seed=0) -> dict:
    """LayerNorm's arguments for :func:`layer_norm_checks` (empty tensors on the ``meta`` device)."""
    gen = torch.Generator().manual_seed(seed)
    x = _normal(gen, device, rows, width * (2 if view else 1)) * 2 + 0.5
    x = {"padded": x[:, :width], "strided": x[:, ::2], None: x}[view]
    weight = 1 + 0.5 * _normal(gen, device, width) if affine[0] else None
    bias = _normal(gen, device, width) if affine[1] else None
    return {"x": _leaf(x, device, dtype), "weight": _leaf(weight, device, dtype), "bias": _leaf(bias, device, dtype)}


def layer_norm_checks(rows, width, dtype, affine=(True, True), *, device="cpu", view=None,
                      seed=0) -> list[Check]:
    """LayerNorm forward and gradients for ``rows`` x ``width`` inputs.

    ``affine`` says which of (weight, bias) are present. ``view`` makes x a non-contiguous view:
    ``"padded"`` (rows of a wider buffer) or ``"strided"`` (every other column).
    """
    inputs = layer_norm_inputs(rows, width, dtype, affine, device=device, view=view, seed=seed)
    label = f"({rows}, {width})" + ("" if affine == (True, True) else f" affine={affine}") + (f" {view}" if view else "")
    # dweight and dbias sum over rows: their atol scale is the largest column sum of |terms|.
    x64 = inputs["x"].detach().cpu().double()
    xhat = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    dy = grad_out((rows, width), dtype, seed).double().abs()
    scales = {"dweight": (dy * xhat.abs()).sum(0).max().item(), "dbias": dy.sum(0).max().item()}
    return check_op("layer_norm", label, fastgpt_kernels.layer_norm, inputs, seed, scales)


# TF32 keeps 10 mantissa bits: the atol of float32 dots that run in TF32 uses its eps.
TF32_EPS = 2.0**-10


def tf32_in_force(dtype: torch.dtype, device) -> bool:
    """Whether float32 dots on ``device`` run in TF32: on a GPU whenever the kernels take float32
    (only while PyTorch's float32 matmuls use TF32 too); never in Triton's interpreter, whose
    dots are exact."""
    return dtype == torch.float32 and torch.device(device).type == "cuda"


@contextlib.contextmanager
def float32_in_tf32():
    """PyTorch's float32 matmuls in TF32 for the block: the mode the kernels take float32 inputs in."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def assert_close_to_exact(got: torch.Tensor, lowp: torch.Tensor, exact: torch.Tensor, name: str = "out",
                          scale: float | None = None) -> None:
    """The 2x-PyTorch rule (:func:`compare`) for one tensor, in the precision in force on its device:
    ``got`` (a kernel's), ``lowp`` (PyTorch's in the same dtype and mode) and ``exact`` (float64)."""
    if scale is None:
        scale = exact.abs().max().item() if exact.numel() else 0.0
    if tf32_in_force(got.dtype, got.device):
        scale *= TF32_EPS / torch.finfo(torch.float32).eps
    check = compare("test", "", name, got, lowp, exact, scale)
    assert check.passed, str(check)


def gelu_mlp_inputs(rows, width, hidden, dtype, biases=(True, True), *, device="cpu", view=None, seed=0) -> dict:
    """The GELU MLP's arguments for :func:`gelu_mlp_checks` (empty tensors on the ``meta`` device)."""
    gen = torch.Generator().manual_seed(seed)
    x = _normal(gen, device, rows, width * (2 if view == "strided" else 1))[:, ::2 if view == "strided" else 1]
    params = {
        "fc_weight": _normal(gen, device, hidden, width) / width**0.5,
        "fc_bias": _normal(gen, device, hidden) if biases[0] else None,
        "proj_weight": _normal(gen, device, width, hidden) / hidden**0.5,
        "proj_bias": _normal(gen, device, width) if biases[1] else None,
    }
    if view == "transposed":
        params = {k: (v.t().contiguous().t() if v is not None and v.dim() == 2 else v) for k, v in params.items()}
    return {"x": _leaf(x, device, dtype), **{k: _leaf(v, device, dtype) for k, v in params.items()}}


def gelu_mlp_checks(rows, width, hidden, dtype, biases=(True, True), *, device="cpu", view=None,
                    seed=0) -> list[Check]:
    """GELU MLP forward and the gradients of x, both weights and both biases.

    x is (rows, width), the hidden width is ``hidden``; ``biases`` says which of (fc_bias,
    proj_bias) are present. ``view`` passes non-contiguous inputs:
    ``"strided"`` (x is every other column of a wider buffer) or ``"transposed"`` (both weights are
    transposes of contiguous tensors, i.e. stored column-major).
    """
    inputs = gelu_mlp_inputs(rows, width, hidden, dtype, biases, device=device, view=view, seed=seed)
    label = f"({rows}, {width}) H={hidden}" + ("" if all(biases) else f" biases={biases}") + (f" {view}" if view else "")
    # The weight and bias gradients sum over rows: their atol scale is the largest sum of |terms|.
    x64, w1, b1, w2, b2 = (None if t is None else t.detach().cpu().double() for t in inputs.values())
    pre = (x64 @ w1.T + (0 if b1 is None else b1)).requires_grad_()
    act = torch.nn.functional.gelu(pre, approximate="tanh")
    dout = grad_out((rows, width), dtype, seed).double()
    dact = dout @ w2
    dpre = torch.autograd.grad(act, pre, dact)[0]
    act = act.detach()
    magnitude = {"dfc_weight": dpre.abs().T @ x64.abs(), "dfc_bias": dpre.abs().sum(0),
                 "dproj_weight": dout.abs().T @ act.abs(), "dproj_bias": dout.abs().sum(0)}
    if tf32_in_force(dtype, device):
        # TF32 dots round their operands to 10 mantissa bits: every GEMM's error is about
        # TF32_EPS x its sum of |terms|, and flows on into the GEMMs after it (|gelu'| < 1.2, |gelu''| < 0.8).
        terms = x64.abs() @ w1.abs().T + (0 if b1 is None else b1.abs())
        act_err = act.abs() + 1.2 * terms
        dpre_err = dpre.abs() + 1.2 * (dout.abs() @ w2.abs()) + 0.8 * dact.abs() * terms
        magnitude = {"out": act_err @ w2.abs().T + (0 if b2 is None else b2.abs()), "dx": dpre_err @ w1.abs(),
                     "dfc_weight": dpre_err.T @ x64.abs(), "dfc_bias": dpre_err.sum(0),
                     "dproj_weight": dout.abs().T @ act_err, "dproj_bias": dout.abs().sum(0)}
        magnitude = {k: v * (TF32_EPS / torch.finfo(torch.float32).eps) if k != "dproj_bias" else v
                     for k, v in magnitude.items()}
    scales = {k: v.max().item() if v.numel() else 0.0 for k, v in magnitude.items()}
    return check_op("gelu_mlp", label, fastgpt_kernels.gelu_mlp, inputs, seed, scales)


def attention_scales(q, k, v, dout, causal, softmax_scale=None, keep=None, dropout_p=0.0) -> dict:
    """atol scales for attention's out, dq, dk and dv: the largest sums of |terms| (in float64).

    With P the attention weights, W = P * keep / (1 - p), dP = (dO V^T) * keep / (1 - p) and delta
    the row sums of P * dP, the kernels sum W |V| for out, W^T |dO| for dv, and P (|dP| + |delta|)
    times |K| (for dq) or |Q| (for dk): the subtraction dP - delta cancels at the size of its terms
    (exactly, when one key holds all the weight). One (T_Q, T_K) matrix per head at a time.
    """
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    found = dict.fromkeys(("out", "dq", "dk", "dv"), 0.0)
    future = torch.ones(T_Q, T_K, dtype=torch.bool, device=q.device).triu(T_K - T_Q + 1)
    for b in range(B):
        for h in range(H):
            qh, kh, vh, doh = (t[b, h].detach().double() for t in (q, k, v, dout))
            scores = scale * qh @ kh.T
            p = torch.softmax(scores.masked_fill(future, float("-inf")) if causal else scores, -1)
            dp = doh @ vh.T
            w = p
            if keep is not None:
                w = p * keep[b, h] / (1 - dropout_p)
                dp = dp * keep[b, h] / (1 - dropout_p)
            terms = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())
            for name, value in (("out", w @ vh.abs()), ("dv", w.T @ doh.abs()), ("dq", scale * terms @ kh.abs()),
                                ("dk", scale * terms.T @ qh.abs())):
                found[name] = max(found[name], value.max().item() if value.numel() else 0.0)
    return found


def attention_inputs(B, H, T, D, dtype, *, layout=None, keys=None, device="cpu", seed=0) -> dict:
    """Attention's arguments for :func:`attention_checks` (empty tensors on the ``meta`` device):
    ``{"qkv": (B, T, 3, H, D)}`` with ``layout="qkv"``, else contiguous ``q``, ``k``, ``v``. With
    ``keys`` (T_K >= T) the queries are the last T of T_K positions."""
    if keys is not None and layout == "qkv":
        raise ValueError("a fused qkv layout has as many queries as keys: keys must be None")
    gen = torch.Generator().manual_seed(seed)
    fused = _normal(gen, device, B, T if keys is None else keys, 3, H, D).to(device=device, dtype=dtype)
    if layout == "qkv":
        return {"qkv": fused.requires_grad_()}
    tensors = {name: fused[:, :, i].transpose(1, 2).contiguous() for i, name in enumerate("qkv")}
    tensors["q"] = tensors["q"][:, :, tensors["q"].shape[2] - T:].contiguous()
    return {name: t.requires_grad_() for name, t in tensors.items()}


def _split_qkv(tensors: dict) -> tuple:
    """q, k, v from :func:`attention_inputs`' tensors: the (B, H, T, D) slices of a fused qkv, or as given."""
    if "qkv" in tensors:
        return tuple(tensors["qkv"][:, :, i].transpose(1, 2) for i in range(3))
    return tensors["q"], tensors["k"], tensors["v"]


def attention_checks(B, H, T, D, dtype, causal=True, *, dropout_p=0.0, softmax_scale=None, layout=None,
                     keys=None, device="cpu", seed=0) -> list[Check]:
    """Attention forward and dq, dk, dv for (B, H, T, D) inputs, atol scales from :func:`attention_scales`.

    ``layout="qkv"`` passes q, k and v as the three strided slices of one fused (B, T, 3, H, D)
    tensor, as the GPT model does, and checks the fused gradient ``dqkv``. ``keys`` (T_K > T) gives
    keys and values of that length, the queries being the last T positions. With ``dropout_p > 0``
    the PyTorch runs apply the kernel's own keep-mask (drawn from the same seed and materialised by
    :func:`fastgpt_kernels.tools.dropout.dropout_mask`) through :func:`fastgpt_kernels.reference.attention_math`.
    """
    from fastgpt_kernels.tools import dropout  # launches a Triton kernel: imported only once Triton is known to work

    inputs = attention_inputs(B, H, T, D, dtype, layout=layout, keys=keys, device=device, seed=seed)
    keep = None
    if dropout_p:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            rng = _dispatch.kernel_module("attention").draw_rng_state(device)
            keep = dropout.dropout_mask(rng, (B, H, T, D), dropout_p, keys=keys)

    def attention(**tensors):
        q, k, v = _split_qkv(tensors)
        if dropout_p and fastgpt_kernels.get_backend() != "triton":
            return reference.attention_math(q, k, v, causal, softmax_scale, keep, dropout_p)
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            torch.manual_seed(seed)  # with dropout, the kernel draws the seed that made ``keep``
            return fastgpt_kernels.attention(q, k, v, causal, dropout_p, softmax_scale)

    q, k, v = _split_qkv(inputs)
    scales = attention_scales(q, k, v, grad_out((B, H, T, D), dtype, seed).to(device), causal, softmax_scale,
                              keep, dropout_p)
    if layout == "qkv":
        scales["dqkv"] = max(scales["dq"], scales["dk"], scales["dv"])
    if tf32_in_force(dtype, device):
        scales = {name: value * TF32_EPS / torch.finfo(dtype).eps for name, value in scales.items()}
    label = (f"({B},{H},{T},{D}){f' T_K={keys}' if keys else ''}{' causal' if causal else ''}"
             f"{f' p={dropout_p}' if dropout_p else ''}"
             f"{f' scale={softmax_scale}' if softmax_scale else ''}{f' {layout}' if layout else ''}")
    return check_op("attention", label, attention, inputs, seed, scales)


def linear_cross_entropy_inputs(rows, width, vocab, dtype, bias=True, ignored="some", *, view=None, device="cpu",
                                seed=0) -> dict:
    """The fused loss's arguments for :func:`linear_cross_entropy_checks` (empty on the ``meta`` device).

    ``ignored``: ``"none"``, ``"some"`` (every third target from the second on is ignore_index) or ``"all"``. ``view``:
    ``"strided"`` passes x as every other column of a wider buffer and weight transposed (column-major).
    """
    gen = torch.Generator().manual_seed(seed)
    x = _normal(gen, device, rows, width * (2 if view == "strided" else 1))[:, ::2 if view == "strided" else 1]
    weight = _normal(gen, device, vocab, width) / width**0.5
    if view == "strided":
        weight = weight.t().contiguous().t()
    targets = torch.randint(max(vocab, 1), (rows,), generator=gen)
    if ignored != "none":
        targets[slice(None) if ignored == "all" else slice(1, None, 3)] = IGNORE_INDEX
    return {"x": _leaf(x, device, dtype), "weight": _leaf(weight, device, dtype),
            "targets": targets.to("meta" if torch.device(device).type == "meta" else device),
            "bias": _leaf(_normal(gen, device, vocab) if bias else None, device, dtype)}


IGNORE_INDEX = -100


def linear_cross_entropy_checks(rows, width, vocab, dtype, bias=True, ignored="some", reduction="mean", *,
                                view=None, fallback=False, device="cpu", seed=0) -> list[Check]:
    """The fused loss and the gradients of x, weight and bias against the unfused
    ``F.cross_entropy(F.linear(x, weight, bias).float(), ...)`` (see
    :func:`linear_cross_entropy_inputs` for ``ignored`` and ``view``). With ``fallback`` the chunked
    PyTorch version (:func:`fastgpt_kernels.reference.linear_cross_entropy`) is checked instead of the kernels."""
    inputs = linear_cross_entropy_inputs(rows, width, vocab, dtype, bias, ignored, view=view, device=device,
                                         seed=seed)
    targets = inputs["targets"]

    def fused(x, weight, targets, bias):
        if fallback:
            return reference.linear_cross_entropy(x, weight, bias, targets, IGNORE_INDEX, reduction)
        return fastgpt_kernels.linear_cross_entropy(x, weight, targets, bias, IGNORE_INDEX, reduction)

    def unfused(x, weight, targets, bias):
        return reference.linear_cross_entropy_unfused(x, weight, bias, targets, IGNORE_INDEX, reduction)

    label = (f"({rows}, {width}) V={vocab} {reduction}" + ("" if bias else " no bias")
             + ("" if ignored == "some" else f" ignored={ignored}") + (f" {view}" if view else "")
             + (" fallback" if fallback else ""))
    # The loss, dweight and dbias sum over rows and dx over the vocabulary: their atol scales are
    # the largest sums of |terms| (float64), each term as the reduction makes it: a row's gradient
    # times its output gradient (check_op's), and for "mean" divided by the rows counted.
    x64, w64 = inputs["x"].detach().cpu().double(), inputs["weight"].detach().cpu().double()
    b64 = None if inputs["bias"] is None else inputs["bias"].detach().cpu().double()
    logits = torch.nn.functional.linear(x64, w64, b64)
    valid = targets.cpu() != IGNORE_INDEX
    divisor = max(int(valid.sum()), 1) if reduction == "mean" else 1
    dloss = grad_out((rows,) if reduction == "none" else (), dtype, seed).double().abs()
    dz = torch.softmax(logits, -1)
    dz[valid.nonzero()[:, 0], targets.cpu()[valid]] -= 1.0
    dz = dz.abs() * (valid * dloss / divisor)[:, None]
    loss_terms = (torch.logsumexp(logits, -1) * valid).abs()
    out_scale = loss_terms.max() if reduction == "none" else loss_terms.sum() / divisor
    scales = {"out": out_scale.item(), "dx": (dz @ w64.abs()).max().item() if dz.numel() else 0.0,
              "dweight": (dz.T @ x64.abs()).max().item() if dz.numel() else 0.0,
              "dbias": dz.sum(0).max().item() if dz.numel() else 0.0}
    if tf32_in_force(dtype, device) and not fallback:  # the kernels' logits and gradient dots run in TF32
        scales = {name: value * TF32_EPS / torch.finfo(dtype).eps for name, value in scales.items()}
    return check_op("linear_cross_entropy", label, fused, inputs, seed, scales, pytorch_fn=unfused)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape, dtype and layout: the arguments of its ``<op>_checks`` function."""

    op: str
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(a for a in self.args if isinstance(a, torch.dtype))

    def describe(self) -> str:
        values = [str(a).removeprefix("torch.") for a in self.args] + [f"{k}={v}" for k, v in self.kwargs.items()]
        return f"{self.op} {' '.join(values)}"

    def why_unsupported(self) -> str | None:
        """Why the op's kernel does not take this case, decided on ``meta`` tensors: nothing is computed."""
        inputs = {"layer_norm": layer_norm_inputs, "gelu_mlp": gelu_mlp_inputs, "attention": attention_inputs,
                  "linear_cross_entropy": linear_cross_entropy_inputs}[self.op]
        shared = {k: v for k, v in self.kwargs.items() if k in ("view", "layout", "keys")}
        # The inputs functions take the leading arguments: not attention's causal, nor the loss's reduction.
        positional = self.args[:{"attention": 5, "linear_cross_entropy": 6}.get(self.op, len(self.args))]
        tensors = inputs(*positional, **shared, device="meta")
        if self.op == "attention":
            tensors = dict(zip("qkv", _split_qkv(tensors)))
        if self.op == "linear_cross_entropy":
            tensors = {k: tensors[k] for k in ("x", "weight", "bias", "targets")}
        with float32_in_tf32():  # as the checks run (see check_op)
            return _dispatch.kernel_module(self.op).why_unsupported(*tensors.values())

    def run(self, device) -> list[Check]:
        checks = {"layer_norm": layer_norm_checks, "gelu_mlp": gelu_mlp_checks, "attention": attention_checks,
                  "linear_cross_entropy": linear_cross_entropy_checks}
        return checks[self.op](*self.args, **self.kwargs, device=device)


GRIDS = ("cpu", "gpu")


def cases(grid: str, dtypes) -> list[Case]:
    """The verification grid: ``"cpu"`` (sizes Triton's interpreter runs in seconds) or ``"gpu"``,
    which adds the shapes of GPT-2-sized models."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}: expected one of {', '.join(GRIDS)}")
    big = grid == "gpu"
    found = []
    shapes = [(1, 1), (3, 7), (8, 768), (5, 1023), (3, 4097), (1, 65536)]
    if big:
        shapes += [(8192, 768), (4096, 1600), (2048, 12288)]
    for dtype in dtypes:
        found += [Case("layer_norm", (rows, width, dtype)) for rows, width in shapes]
        found.append(Case("layer_norm", (4, 768, dtype, (False, False))))
        found.append(Case("layer_norm", (4, 100, dtype, (True, False)), {"view": "strided"}))
        found.append(Case("layer_norm", (4, 100, dtype, (False, True)), {"view": "padded"}))
    # (rows, C, H): H = 4C, H not a multiple of 16 (200), odd C (100), one row and many.
    mlp_shapes = [(1, 16, 64), (7, 48, 192), (100, 100, 400), (257, 128, 200)]
    if big:
        mlp_shapes += [(8192, 768, 3072), (2048, 1600, 6400)]
    for dtype in dtypes:
        found += [Case("gelu_mlp", (rows, width, hidden, dtype)) for rows, width, hidden in mlp_shapes]
        found.append(Case("gelu_mlp", (33, 48, 192, dtype, (False, False))))
        found.append(Case("gelu_mlp", (17, 64, 256, dtype), {"view": "strided"}))
        found.append(Case("gelu_mlp", (17, 64, 256, dtype), {"view": "transposed"}))
    for dtype in dtypes:
        # Every length and head dimension in float16; a few of each in the other dtypes.
        lengths, widths = ((1, 17, 100, 257), (16, 48, 128)) if dtype == torch.float16 else ((17, 100), (48,))
        found += [Case("attention", (1, 2, T, 64, dtype)) for T in lengths]
        found += [Case("attention", (1, 2, 100, D, dtype, False)) for D in widths]
        found.append(Case("attention", (1, 2, 64, 64, dtype, False), {"softmax_scale": 0.3, "layout": "qkv"}))
        # Queries fewer than keys (new tokens against a cache): one query, and a ragged block.
        found += [Case("attention", (1, 2, T, 64, dtype), {"keys": 100}) for T in (1, 37)]
        found += [Case("attention", (2, 2, 64, 32, dtype, causal), {"dropout_p": 0.1}) for causal in (True, False)]
        if big:
            found.append(Case("attention", (4, 12, 1024, 64, dtype), {"layout": "qkv"}))
            found.append(Case("attention", (2, 16, 2048, 128, dtype), {"dropout_p": 0.1}))
    # (rows, C, V): one row, V = 1, odd widths, GPT-2's vocabulary; every reduction; ignored targets.
    for dtype in dtypes:
        for rows, width, vocab in ((1, 16, 17), (7, 100, 1), (300, 100, 1000), (7, 16, 50257)):
            found.append(Case("linear_cross_entropy", (rows, width, vocab, dtype)))
        found.append(Case("linear_cross_entropy", (33, 48, 300, dtype, False, "none", "sum")))
        found.append(Case("linear_cross_entropy", (33, 48, 300, dtype, True, "all", "none")))
        found.append(Case("linear_cross_entropy", (17, 64, 100, dtype), {"view": "strided"}))
        if big:
            found.append(Case("linear_cross_entropy", (8192, 768, 50257, dtype)))
    return found


def _interpreter_bf16_ready() -> str | None:
    """Install the interpreter's bfloat16 shim; the reason when bfloat16 cannot be checked."""
    from fastgpt_kernels.tools import bf16_shim

    try:
        bf16_shim.install_bf16_shim()
    except RuntimeError as exc:
        return str(exc)
    return None


HEADER = f"{'op':<11} {'case':<28} {'dtype':<9} {'tensor':<8} {'max err':>10} {'torch err':>10} {'bound':>10}  result"


def _row(c: Check) -> str:
    return (f"{c.op:<11} {c.case:<28} {c.dtype:<9} {c.tensor:<8} {c.error:>10.3e} {c.torch_error:>10.3e} "
            f"{c.bound:>10.3e}  {'PASS' if c.passed else 'FAIL ' + c.detail}")


def dry_run(grid: str, dtypes) -> list[tuple[Case, str | None]]:
    """Every case of ``grid`` with the kernel's reason for not taking it (None: it does), computing nothing."""
    return [(case, case.why_unsupported()) for case in cases(grid, dtypes)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgpt_kernels.tools.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="check only this dtype (repeatable; default: all)")
    parser.add_argument("--grid", choices=GRIDS,
                        help="the cases: 'gpu' adds GPT-2-sized shapes (default: gpu on a GPU, else cpu)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cases and whether the kernels take them, without computing anything")
    args = parser.parse_args(argv)
    if _dispatch.NO_TRITON_REASON:
        print(f"cannot verify the Triton kernels: {_dispatch.NO_TRITON_REASON}", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in (args.dtype or DTYPES)]
    grid = args.grid or ("gpu" if torch.cuda.is_available() else "cpu")
    if args.dry_run:
        decisions = dry_run(grid, dtypes)
        for case, reason in decisions:
            print(f"{case.describe():<60} {'runs' if reason is None else 'SKIP ' + reason}")
        skipped = sum(reason is not None for _, reason in decisions)
        print(f"{len(decisions)} cases in the {grid} grid: {len(decisions) - skipped} run, {skipped} skipped")
        return 0
    if torch.cuda.is_available():
        device = "cuda"
        where = f"GPU {torch.cuda.get_device_name()}"
    elif not _dispatch.INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
        # @triton.jit reads TRITON_INTERPRET at import time: start again with it on.
        print("no CUDA device: running the Triton kernels in Triton's interpreter on CPU tensors",
              file=sys.stderr)
        # One BLAS thread: the interpreter's tl.dot is a NumPy matmul of one small tile at a time.
        env = {"OPENBLAS_NUM_THREADS": "1", **os.environ, "TRITON_INTERPRET": "1"}
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "fastgpt_kernels.tools.verify", *argv], env)
    elif _dispatch.INTERPRETED:
        device = "cpu"
        where = "CPU, Triton interpreter"
    else:
        print("TRITON_INTERPRET=1 is set but this triton did not switch its interpreter on", file=sys.stderr)
        return 2
    notes = []
    if device == "cpu" and torch.bfloat16 in dtypes and (why := _interpreter_bf16_ready()):
        dtypes.remove(torch.bfloat16)
        notes.append(f"bfloat16 not checked: {why}")
    print(f"fastgpt_kernels.tools.verify on {where}, torch {torch.__version__}, {grid} grid")
    print(HEADER)
    print("-" * len(HEADER))
    failures = total = skipped = 0
    for case in cases(grid, dtypes):
        reason = case.why_unsupported()
        if reason is not None:  # the dispatcher would run the PyTorch reference here: nothing to verify
            skipped += 1
            print(f"{case.op:<11} {case.describe().removeprefix(case.op + ' '):<48} SKIP {reason}", flush=True)
            continue
        for c in case.run(device):
            total += 1
            failures += not c.passed
            print(_row(c), flush=True)
    for note in notes:
        print(note)
    print(f"{total - failures} passed, {failures} failed, {skipped} cases skipped (the kernels do not take them)")
    return 1 if failures or not total else 0


if __name__ == "__main__":
    sys.exit(main())
