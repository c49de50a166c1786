"""The numeric rule every kernel is held to, and the helpers that apply it.

For an op's output and each input gradient, three computations from the same inputs: the Triton
kernel's (on a GPU, or in Triton's interpreter on CPU tensors), the PyTorch reference's in the same
dtype, and the PyTorch reference's in float64. A tensor passes when

    max|kernel - float64| <= 2 * max|pytorch - float64| + atol,   atol = eps(dtype) * scale

that is, the kernel is at most about twice as far from the exact answer as PyTorch's own op in the
same precision. ``scale`` is max|float64| for most tensors; for a sum over many terms (LayerNorm's
dweight, dbias; attention's output and gradients) it is the largest sum of |terms|, the magnitude
an fp32 accumulation of those terms is rounded at (PyTorch's CPU reductions are more accurate than
fp32 accumulation); each op's declaration (:mod:`fastgpt_kernels.registry`) derives its scales.
float32 is checked with PyTorch's float32 matmuls in TF32, the mode in which the kernels take
float32 (on a GPU their dots then run in TF32: the atol uses TF32's eps). Outputs are allocated
poisoned (NaN), so an element the kernel never writes fails.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

import fastgpt_kernels

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IGNORE_INDEX = -100  # the fused loss's ignored target in the checks, as PyTorch's default


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


def normal(gen: torch.Generator, device, *shape) -> torch.Tensor:
    """Standard normal values from ``gen`` (float32, CPU), or an empty tensor on the ``meta`` device."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta")
    return torch.randn(shape, generator=gen)


def leaf(t: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    """``t`` as a leaf of ``dtype`` on ``device`` that requires grad (None stays None)."""
    return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()


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
