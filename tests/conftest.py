"""Root test configuration.

Without a CUDA device the kernel tests run the real Triton kernels in Triton's interpreter on CPU
tensors. ``@triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, so it is set here,
before any project module is imported.
"""
import os

# The interpreter runs tl.dot as a NumPy matmul on one small tile at a time; OpenBLAS's worker
# threads make that hundreds of times slower on a loaded 2-core machine. Read when NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Tests never read or write the user's autotuning cache (tests of the cache give it a directory).
os.environ["FASTGPT_AUTOTUNE_CACHE"] = "off"
# Nor take the user's backend: every test (and every program a test starts) begins under "auto";
# tests of FASTGPT_BACKEND set it in the programs they start.
os.environ.pop("FASTGPT_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from fastgpt_kernels import _dispatch  # noqa: E402  (imported after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_unavailable_reason():
    if DEVICE == "cuda" or not _dispatch.INTERPRETED:
        return None
    from fastgpt_kernels.tools import bf16_shim

    try:
        bf16_shim.install_bf16_shim()
    except RuntimeError as exc:
        return str(exc)
    return None


BF16_SKIP_REASON = _bf16_unavailable_reason()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def seeded_and_under_auto():
    """Every test starts from the same random state and under the ``auto`` backend, whatever ran
    before it: no test depends on the order, and one that sets a backend cannot leak it."""
    import random

    import numpy as np

    import fastgpt_kernels

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    with fastgpt_kernels.use_backend("auto"):
        yield


@pytest.fixture(autouse=True)
def float32_matmuls_in_tf32():
    """Every test runs with PyTorch's float32 matmuls in TF32, the mode in which the kernels take
    float32 inputs (see fastgpt_kernels.ops._common.tf32_enabled); tests of the other mode set it themselves."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = previous


def dtype_param(dtype):
    """A pytest param for ``dtype``, skipped for bfloat16 when the interpreter cannot do it."""
    marks = [pytest.mark.skip(reason=BF16_SKIP_REASON)] if dtype is torch.bfloat16 and BF16_SKIP_REASON else []
    return pytest.param(dtype, marks=marks, id=str(dtype).removeprefix("torch."))


ALL_DTYPES = [dtype_param(d) for d in (torch.float32, torch.float16, torch.bfloat16)]


def float32_tolerance(device=DEVICE) -> dict:
    """``assert_close`` tolerances for float32 results that went through the kernels' dots, compared
    with PyTorch's in the same mode: exact dots in Triton's interpreter, TF32 ones on a GPU (10-bit
    mantissa: a relative rounding of 2^-11 per operand, a few times that after a few layers)."""
    if torch.device(device).type == "cuda":
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-4, atol=1e-4)


def assert_backward_deterministic(fn, inputs, dy):
    """Two backward passes of ``fn(*inputs)`` under the ``triton`` backend give bit-identical gradients."""
    import fastgpt_kernels

    with fastgpt_kernels.use_backend("triton"):
        first = torch.autograd.grad(fn(*inputs), inputs, dy)
        second = torch.autograd.grad(fn(*inputs), inputs, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, or a process gone, does not), from ``/proc``."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def assert_processes_end(pids, seconds: float, what: str) -> None:
    """Fail unless every process of ``pids`` has ended within ``seconds``; whatever still runs then
    is killed, so no test leaves a process behind."""
    import signal
    import time

    deadline = time.monotonic() + seconds
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            pytest.fail(f"{what} outlived {seconds:.0f} s")
        time.sleep(0.1)


def scale_after_launch(monkeypatch, module, names, tensor: str, factor: float) -> None:
    """A wrong kernel as verify sees it: ``module.run`` (the op's plan runner, see
    :func:`fastgpt_kernels.ops._common.run`) multiplies its output ``tensor`` by ``factor`` after the
    launches wrote it (``factor`` None: :func:`output_factor` of its dtype). ``names(plan)`` names a
    plan's outputs, in order."""
    real_run = module.run

    def wrong_run(plan):
        outputs = list(real_run(plan))
        plan_names = names(plan)
        if tensor in plan_names:
            i = plan_names.index(tensor)
            outputs[i] = outputs[i] * (output_factor(outputs[i].dtype) if factor is None else factor)
        return tuple(outputs)

    monkeypatch.setattr(module, "run", wrong_run)


def output_factor(dtype: torch.dtype) -> float:
    """A wrong output's factor: 1% off, or 4 ulps where 1% is less. In bfloat16 1% is 1.3 ulps, one
    rounding of the largest element: no bound can tell that from a right kernel."""
    return 1 + max(0.01, 4 * torch.finfo(dtype).eps)


# The mutants every op's tests feed verify: the output off (output_factor); each gradient zeroed,
# halved, x1.5.
GRADIENT_FACTORS = {"x0": 0.0, "x0.5": 0.5, "x1.5": 1.5}


def output_mutants(gradients) -> dict:
    """``{label: (tensor, factor)}`` for :func:`scale_after_launch`: the output off by
    :func:`output_factor`, and each of ``gradients`` times each of GRADIENT_FACTORS."""
    return {"out +1%": ("out", None),
            **{f"{g} {label}": (g, f) for g in gradients for label, f in GRADIENT_FACTORS.items()}}


def run_python(code: str, **env):
    """Run ``code`` (dedented) in a fresh interpreter with the environment changed by ``env`` (None
    removes a variable): its ``subprocess.CompletedProcess``, output captured."""
    import subprocess
    import sys
    import textwrap

    new_env = {k: v for k, v in os.environ.items() if k not in env}
    new_env.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=new_env,
                          capture_output=True, text=True, timeout=120)
