"""Root test configuration.

Without a CUDA device the kernel tests run the real Triton kernels in Triton's interpreter on CPU
tensors. ``@triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, so it is set here,
before any project module is imported.
"""
import os

# The interpreter runs tl.dot as a NumPy matmul on one small tile at a time; OpenBLAS's worker
# threads make that hundreds of times slower on a loaded 2-core machine. Read when NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels import _dispatch  # noqa: E402  (imported after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_unavailable_reason():
    if DEVICE == "cuda" or not _dispatch.INTERPRETED:
        return None
    from kernels.tools import bf16_shim

    try:
        bf16_shim.install_bf16_shim()
    except RuntimeError as exc:
        return str(exc)
    return None


BF16_SKIP_REASON = _bf16_unavailable_reason()


@pytest.fixture
def device():
    return DEVICE


def dtype_param(dtype):
    """A pytest param for ``dtype``, skipped for bfloat16 when the interpreter cannot do it."""
    marks = [pytest.mark.skip(reason=BF16_SKIP_REASON)] if dtype is torch.bfloat16 and BF16_SKIP_REASON else []
    return pytest.param(dtype, marks=marks, id=str(dtype).removeprefix("torch."))


ALL_DTYPES = [dtype_param(d) for d in (torch.float32, torch.float16, torch.bfloat16)]


def assert_backward_deterministic(fn, inputs, dy):
    """Two backward passes of ``fn(*inputs)`` under the ``triton`` backend give bit-identical gradients."""
    import kernels

    with kernels.use_backend("triton"):
        first = torch.autograd.grad(fn(*inputs), inputs, dy)
        second = torch.autograd.grad(fn(*inputs), inputs, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
