"""``python -m fastgpt_kernels.tools.verify``: every Triton kernel against a float64 reference, forward and backward.

For each op of the registry (:mod:`fastgpt_kernels.registry`) and each of its verification cases,
the op's output and every input gradient are computed by the Triton kernel (on a GPU, or in Triton's
interpreter on CPU tensors), by the PyTorch reference in the same dtype, and by the PyTorch
reference in float64, and held to the rule of :mod:`fastgpt_kernels.tools.checking`: at most about
twice PyTorch's own error. The command prints one row per tensor, skips (saying why) the cases the
kernels do not take, and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from fastgpt_kernels import _dispatch, registry
from fastgpt_kernels.tools.checking import DTYPES, Check, float32_in_tf32

@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape, dtype and layout: the arguments of its declaration's ``checks``."""

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
        with float32_in_tf32():  # as the checks run (see checking.check_op)
            return registry.declaration(self.op).unsupported(*self.args, **self.kwargs)

    def run(self, device) -> list[Check]:
        return registry.declaration(self.op).checks(*self.args, **self.kwargs, device=device)


GRIDS = ("cpu", "gpu")


def cases(grid: str, dtypes) -> list[Case]:
    """The verification grid: ``"cpu"`` (sizes Triton's interpreter runs in seconds) or ``"gpu"``,
    which adds the shapes of GPT-2-sized models; every op's cases in each dtype."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}: expected one of {', '.join(GRIDS)}")
    return [Case(declared.NAME, args, kwargs) for declared in registry.declarations() for dtype in dtypes
            for args, kwargs in declared.verify_cases(grid == "gpu", dtype)]


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
