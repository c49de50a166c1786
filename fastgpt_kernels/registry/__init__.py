"""The registry of ops: each op declares itself once, in ``fastgpt_kernels/registry/<op>.py``.

:data:`OPS` names the ops. For an op ``name`` there are the public function ``fastgpt_kernels.<name>``,
its Triton kernels in ``fastgpt_kernels/ops/<name>.py``, its PyTorch version ``reference.<name>``, its
tests in ``tests/test_<name>.py``, and its declaration module here, which everything that goes
over every op reads (the dispatcher's list, verify, the compile report, the GPU report, the
benchmarks and the tests). A declaration module defines:

``NAME``                 the op's name, as in :data:`OPS`.
``inputs(...)``          example inputs: ``{argument: tensor}`` for the public function, the floating
                         tensors leaves that require grad (empty tensors on the ``meta`` device).
``checks(...)``          the op's output and gradients against float64 and PyTorch
                         (:func:`fastgpt_kernels.tools.checking.check_op`), each tensor's error bound
                         derived for the op. Its leading positional arguments are ``inputs``'s.
``verify_cases(big, dtype)``  ``[(args, kwargs)]`` for ``checks``: the verification grid in one dtype,
                         with GPT-2-sized shapes when ``big``.
``unsupported(*args, **kwargs)``  why the kernels do not take the ``checks`` case, decided on meta
                         tensors (None: they do).
``BENCH_SHAPES``         ``{size: dims}`` for the benchmarks' sizes ``tiny``, ``quick``, ``full`` and
                         ``gpt2``; ``bench_inputs(dims, dtype, device, seed)`` builds the inputs;
                         ``step_dims(tokens, width, heads, vocab)``, the op's dims in a GPT step.
``DETERMINISM``          ``((label, options), ...)``: the calls (public function's keyword options)
                         whose forward and backward must be bitwise reproducible.
``compile_specs()``      a :class:`CompileSpec` per kernel launch configuration to compile ahead of time.
``sanitizer_calls(dtype)``  :class:`SanitizerCall` s: small calls that together run every launch
                         config under compute-sanitizer.
``fixed_configs()``      labels of the launch configs the autotuner does not choose (the shape
                         picks them): the sanitizer calls must cover each.

Declarations import the op's Triton module only inside the functions that need it, so this
registry is readable without Triton.
"""
from __future__ import annotations

import dataclasses
import importlib

OPS = ("layer_norm", "attention", "gelu_mlp", "linear_cross_entropy")


def declaration(op: str):
    """The declaration module of ``op`` (``fastgpt_kernels.registry.<op>``)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {', '.join(OPS)}")
    return importlib.import_module(f"{__name__}.{op}")


def declarations() -> list:
    """Every op's declaration module, in :data:`OPS` order."""
    return [declaration(op) for op in OPS]


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One launch configuration of one kernel, described by the arguments a real launch passes."""
    kernel: object            # the @triton.jit function (or the .fn of an Autotuner)
    config: str               # human-readable config label, e.g. "BLOCK_N=1024 warps=4 fp16"
    args: tuple               # example positional args: CPU tensors of real dtypes/shapes, ints, floats
    kwargs: dict              # constexpr meta-parameters and launch options (num_warps, num_stages)
    uses_tensor_cores: bool = False  # its tl.dot must run on tensor cores (16-bit or TF32 operands)
    largest: bool = False     # among its kernel's most demanding specs (see compile_report)


@dataclasses.dataclass(frozen=True)
class SanitizerCall:
    """A small forward and backward of the public function on ``bench_inputs(dims, ...)`` with keyword
    ``options``, once per round: round i pins config i (cyclically) of each autotuned kernel in
    ``allowed`` (``{kernel name: [configs]}``). ``covers`` names the :func:`fixed_configs` it runs."""
    label: str
    dims: dict
    options: dict = dataclasses.field(default_factory=dict)
    allowed: dict = dataclasses.field(default_factory=dict)
    covers: tuple = ()
