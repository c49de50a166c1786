"""``python -m kernels.verify``: every Triton kernel against a float64 reference, forward and backward.

For each op, shape and dtype the op's output and every input gradient are computed three ways from
the same inputs: by the Triton kernel (on a GPU, or in Triton's interpreter on CPU tensors), by the
PyTorch reference in the same dtype, and by the PyTorch reference in float64. A tensor passes when

    max|kernel - float64| <= 2 * max|pytorch - float64| + atol,   atol = eps(dtype) * scale

that is, the kernel is at most about twice as far from the exact answer as PyTorch's own op in the
same precision. ``scale`` is max|float64| for most tensors; for a gradient that sums over rows
(LayerNorm's dweight, dbias) it is the largest sum of |terms|, the magnitude an fp32 accumulation
of those terms is rounded at (PyTorch's CPU reductions are more accurate than fp32 accumulation). Outputs are allocated poisoned (NaN), so an element the kernel never writes fails.
The command prints one row per tensor and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import torch

import kernels
from kernels import _dispatch

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
    err = (got.detach().double().cpu() - exact).abs()
    torch_err = (lowp.detach().double().cpu() - exact).abs()
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
    with kernels.use_backend(backend):
        out = fn(**leaves)
    dout = make_grad_out(out)
    wrt = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    with kernels.use_backend(backend):
        grads = torch.autograd.grad(out, [leaves[k] for k in wrt], dout)
    return {"out": out, **{f"d{k}": g for k, g in zip(wrt, grads)}}


def grad_out(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The output gradient used for ``seed``: normal values representable in ``dtype``, on the CPU."""
    gen = torch.Generator().manual_seed(seed + 7919)  # a stream unrelated to the inputs'
    return torch.randn(tuple(shape), generator=gen).to(dtype)


def check_op(op: str, case: str, fn, inputs: dict, seed: int = 0, scales: dict | None = None) -> list[Check]:
    """Compare ``fn`` (a public op of :mod:`kernels`) on the Triton backend against PyTorch.

    ``inputs`` maps argument names to values; tensors with ``requires_grad`` get gradients checked
    (named ``d<name>``). The output gradient is :func:`grad_out`; the float64 run uses the same
    values (inputs and output gradient) upcast. ``scales`` overrides the atol scale per tensor.
    """
    dtype = next(v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())

    def make_grad_out(out):
        return grad_out(out.shape, dtype, seed).to(device=out.device, dtype=out.dtype)

    exact_inputs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for k, v in inputs.items()}
    with poisoned_allocations():
        got = _forward_backward(fn, inputs, make_grad_out, "triton")
    lowp = _forward_backward(fn, inputs, make_grad_out, "torch")
    exact = _forward_backward(fn, exact_inputs, make_grad_out, "torch")
    scales = scales or {}
    return [compare(op, case, name, got[name], lowp[name], exact[name], scales.get(name)) for name in got]


def layer_norm_checks(rows, width, dtype, affine=(True, True), *, device="cpu", view=None,
                      seed=0) -> list[Check]:
    """LayerNorm forward and gradients for ``rows`` x ``width`` inputs.

    ``affine`` says which of (weight, bias) are present. ``view`` makes x a non-contiguous view:
    ``"padded"`` (rows of a wider buffer) or ``"strided"`` (every other column).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width * (2 if view else 1), generator=gen) * 2 + 0.5
    x = {"padded": x[:, :width], "strided": x[:, ::2], None: x}[view]
    weight = 1 + 0.5 * torch.randn(width, generator=gen) if affine[0] else None
    bias = torch.randn(width, generator=gen) if affine[1] else None
    inputs = {
        "x": x.to(device=device, dtype=dtype).requires_grad_(),
        "weight": None if weight is None else weight.to(device=device, dtype=dtype).requires_grad_(),
        "bias": None if bias is None else bias.to(device=device, dtype=dtype).requires_grad_(),
    }
    label = f"({rows}, {width})" + ("" if affine == (True, True) else f" affine={affine}") + (f" {view}" if view else "")
    # dweight and dbias sum over rows: their atol scale is the largest column sum of |terms|.
    x64 = x.to(dtype).double()
    xhat = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    dy = grad_out((rows, width), dtype, seed).double().abs()
    scales = {"dweight": (dy * xhat.abs()).sum(0).max().item(), "dbias": dy.sum(0).max().item()}
    return check_op("layer_norm", label, kernels.layer_norm, inputs, seed, scales)


def cases(device: str, dtypes):
    """The verification grid: ``(description, thunk returning checks)`` pairs."""
    big = device == "cuda"
    shapes = [(1, 1), (3, 7), (8, 768), (5, 1023), (3, 4097), (1, 65536)]
    if big:
        shapes += [(8192, 768), (4096, 1600), (2048, 12288)]
    for dtype in dtypes:
        for rows, width in shapes:
            yield lambda r=rows, w=width, d=dtype: layer_norm_checks(r, w, d, device=device)
        yield lambda d=dtype: layer_norm_checks(4, 768, d, (False, False), device=device)
        yield lambda d=dtype: layer_norm_checks(4, 100, d, (True, False), device=device, view="strided")
        yield lambda d=dtype: layer_norm_checks(4, 100, d, (False, True), device=device, view="padded")


def _interpreter_bf16_ready() -> str | None:
    """Install the interpreter's bfloat16 shim; the reason when bfloat16 cannot be checked."""
    from kernels import _interpreter

    try:
        _interpreter.install_bf16_shim()
    except RuntimeError as exc:
        return str(exc)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="check only this dtype (repeatable; default: all)")
    args = parser.parse_args(argv)
    if _dispatch.NO_TRITON_REASON:
        print(f"cannot verify the Triton kernels: {_dispatch.NO_TRITON_REASON}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        device = "cuda"
        where = f"GPU {torch.cuda.get_device_name()}"
    elif not _dispatch.INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
        # @triton.jit reads TRITON_INTERPRET at import time: start again with it on.
        print("no CUDA device: running the Triton kernels in Triton's interpreter on CPU tensors",
              file=sys.stderr)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "kernels.verify", *(argv or sys.argv[1:])], env)
    elif _dispatch.INTERPRETED:
        device = "cpu"
        where = "CPU, Triton interpreter"
    else:
        print("TRITON_INTERPRET=1 is set but this triton did not switch its interpreter on", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in (args.dtype or DTYPES)]
    skipped = []
    if device == "cpu" and torch.bfloat16 in dtypes and (why := _interpreter_bf16_ready()):
        dtypes.remove(torch.bfloat16)
        skipped.append(f"bfloat16 not checked: {why}")
    print(f"kernels.verify on {where}, torch {torch.__version__}")
    header = f"{'op':<11} {'case':<28} {'dtype':<9} {'tensor':<8} {'max err':>10} {'torch err':>10} {'bound':>10}  result"
    print(header)
    print("-" * len(header))
    failures = total = 0
    for thunk in cases(device, dtypes):
        for c in thunk():
            total += 1
            failures += not c.passed
            print(f"{c.op:<11} {c.case:<28} {c.dtype:<9} {c.tensor:<8} {c.error:>10.3e} {c.torch_error:>10.3e} "
                  f"{c.bound:>10.3e}  {'PASS' if c.passed else 'FAIL ' + c.detail}", flush=True)
    for note in skipped:
        print(note)
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures or not total else 0


if __name__ == "__main__":
    sys.exit(main())
