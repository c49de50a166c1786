"""Host-side helpers that the op modules share."""
from __future__ import annotations

import contextlib
import functools

import torch

# Why float32 inputs fall back while TF32 is off (see tf32_enabled).
FLOAT32_NEEDS_TF32 = (
    "float32 inputs while PyTorch's float32 matmuls run in full precision "
    "(torch.backends.cuda.matmul.fp32_precision is not 'tf32'): the kernels' float32 dots run in TF32, "
    "so PyTorch's own ops run these; set torch.backends.cuda.matmul.fp32_precision = 'tf32' (or "
    "torch.set_float32_matmul_precision('high')) to use the kernels")


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up, for positive ``b``: a host-side ``triton.cdiv`` (which newer tritons
    make a ``constexpr_function``, costing microseconds a call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n`` <= 1): a host-side ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def as_rows(t: torch.Tensor, unit_column_stride: bool = False) -> tuple[torch.Tensor, int, int, int]:
    """``(tensor, rows, row stride, column stride)``: ``t`` (..., C) as rows of C elements for the
    kernels, which see only its data pointer and these strides: ``t`` itself when contiguous (no
    view made), else a (rows, C) view when the layout allows, or a copy; with
    ``unit_column_stride`` a copy too when the columns are strided."""
    c = t.shape[-1]
    if t.is_contiguous():
        return t, t.numel() // c, c, 1
    rows = t.reshape(-1, c)
    if unit_column_stride and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, rows.shape[0], rows.stride(0), rows.stride(1)


def run(plan):
    """Launch a plan's kernels in order and return its outputs.

    A plan is ``(outputs, launches)``, each launch ``(kernel, grid, args, meta)``: the op modules
    build plans so that the same launches can be run, compiled ahead of time, or inspected. Triton
    launches on the current CUDA device, so a plan whose tensors live on another GPU runs with that
    GPU made current (the first tensor argument's device: an op's tensors share one).
    """
    outputs, launches = plan
    if not launches:
        return outputs
    with on_device_of(launches[0][2]):
        for kernel, grid, args, meta in launches:
            kernel[grid](*args, **meta)
    return outputs


def on_device_of(args):
    """A context that makes the first CUDA tensor among ``args`` the current device, when it is not."""
    for a in args:
        if getattr(a, "is_cuda", False):
            index = a.device.index
            if index is not None and index != torch.cuda.current_device():
                return torch.cuda.device(index)
            break
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device``; None elsewhere (Triton's interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


# torch.compile cannot trace the flag's getter; the decision it feeds (kernel or PyTorch op, which
# compute the same function) is then fixed when a graph is compiled.
@torch.compiler.assume_constant_result
def tf32_enabled() -> bool:
    """Whether PyTorch's float32 CUDA matmuls use TF32 now.

    The kernels with ``tl.dot`` take float32 inputs only then, and run their dots in TF32 as PyTorch
    would: ``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``allow_tf32 = True`` and
    ``torch.set_float32_matmul_precision("high")`` also set. Otherwise (PyTorch's default: full
    float32) PyTorch's ops run them, exactly as the user asked. Without tensor cores a float32 dot
    in full precision needs the whole tiles in registers: the kernels' tiles would spill.
    """
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def eager_function(forward, setup_context, backward):
    """An op's forward with its autograd, called directly: what the public functions call outside
    torch.compile. Each op is also a ``torch.library`` custom op, which torch.compile needs to keep
    the kernels in one graph; but the library's dispatch of a custom op costs several times the rest
    of a call on the host, so eager calls take this path instead, with the same ``setup_context``
    and ``backward`` (run only when a gradient is needed). Gradients of outputs that feed nothing
    arrive in ``backward`` as None (none are made of zeros).
    """
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)
            outputs = forward(*inputs)
            setup_context(ctx, inputs, outputs)
            return outputs

    Function.backward = staticmethod(backward)

    def call(*inputs):
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return Function.apply(*inputs)
        return forward(*inputs)

    return call


def traced_or_eager(op, function):
    """``op`` (a custom op) while torch.compile traces, else ``function`` (its body, called directly)."""
    return op if torch.compiler.is_compiling() else function
