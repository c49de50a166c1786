"""LayerNorm's declaration (see :mod:`fastgpt_kernels.registry`): inputs, checks, cases, specs, calls."""
from __future__ import annotations

import torch

import fastgpt_kernels
from fastgpt_kernels import _dispatch
from fastgpt_kernels.registry import CompileSpec, SanitizerCall
from fastgpt_kernels.tools.checking import Check, check_op, grad_out, leaf, normal

NAME = "layer_norm"


def inputs(rows, width, dtype, affine=(True, True), *, device="cpu", view=None, seed=0) -> dict:
    """x (rows, width), weight and bias (those ``affine`` says are present). ``view`` makes x a
    non-contiguous view: ``"padded"`` (rows of a wider buffer) or ``"strided"`` (every other column)."""
    gen = torch.Generator().manual_seed(seed)
    x = normal(gen, device, rows, width * (2 if view else 1)) * 2 + 0.5
    x = {"padded": x[:, :width], "strided": x[:, ::2], None: x}[view]
    weight = 1 + 0.5 * normal(gen, device, width) if affine[0] else None
    bias = normal(gen, device, width) if affine[1] else None
    return {"x": leaf(x, device, dtype), "weight": leaf(weight, device, dtype), "bias": leaf(bias, device, dtype)}


def checks(rows, width, dtype, affine=(True, True), *, device="cpu", view=None, seed=0) -> list[Check]:
    """LayerNorm forward and gradients on :func:`inputs`; dweight and dbias sum over rows, so their
    atol scale is the largest column sum of |terms|."""
    tensors = inputs(rows, width, dtype, affine, device=device, view=view, seed=seed)
    label = f"({rows}, {width})" + ("" if affine == (True, True) else f" affine={affine}") + (f" {view}" if view else "")
    x64 = tensors["x"].detach().cpu().double()
    xhat = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    dy = grad_out((rows, width), dtype, seed).double().abs()
    scales = {"dweight": (dy * xhat.abs()).sum(0).max().item(), "dbias": dy.sum(0).max().item()}
    return check_op(NAME, label, fastgpt_kernels.layer_norm, tensors, seed, scales)


def verify_cases(big: bool, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """One row and many, widths 1, 7, 1023 (ragged), 4097 (past the one-block limit) and 65536;
    without weight and bias; strided and padded views."""
    shapes = [(1, 1), (3, 7), (8, 768), (5, 1023), (3, 4097), (1, 65536)]
    if big:
        shapes += [(8192, 768), (4096, 1600), (2048, 12288)]
    found = [((rows, width, dtype), {}) for rows, width in shapes]
    found.append(((4, 768, dtype, (False, False)), {}))
    found.append(((4, 100, dtype, (True, False)), {"view": "strided"}))
    found.append(((4, 100, dtype, (False, True)), {"view": "padded"}))
    return found


def unsupported(*args, view=None, **kwargs) -> str | None:
    """Why the kernels do not take the :func:`checks` case (decided on meta tensors)."""
    tensors = inputs(*args, view=view, device="meta")
    return _dispatch.kernel_module(NAME).why_unsupported(*tensors.values())


BENCH_SHAPES = {"tiny": dict(M=64, N=32), "quick": dict(M=1024, N=384), "full": dict(M=4096, N=384),
                "gpt2": dict(M=16384, N=768)}


def step_dims(tokens: int, width: int, heads: int, vocab: int) -> dict:
    """The dims of LayerNorm in a GPT step of ``tokens`` tokens: one row per token."""
    return dict(M=tokens, N=width)


def bench_inputs(dims: dict, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """:func:`inputs` for M rows of width N."""
    return inputs(dims["M"], dims["N"], dtype, device=device, seed=seed)


DETERMINISM = (("layer_norm", {}),)


def compile_specs():
    """Each launch configuration of ``block_config`` in each dtype, with weight and bias; every
    weight/bias combination for one one-block and the chunked configuration; the two
    specialisations the JIT makes for unusual widths (N=1, N not a multiple of 16); and the
    backward planned for a GPU with 132 multiprocessors (an H100), as a GPU plans it."""
    layer_norm = _dispatch.kernel_module(NAME)

    def specs(n, dtype, has_weight=True, has_bias=True, sms=None, largest=False):
        x = torch.empty(4 if sms is None else 4096, n, dtype=dtype)
        weight = torch.empty(n, dtype=dtype) if has_weight else None
        bias = torch.empty(n, dtype=dtype) if has_bias else None
        (y, mean, rstd), forward = layer_norm.forward_plan(x, weight, bias, 1e-5)
        _, backward = layer_norm.backward_plan(torch.empty_like(y), x, weight, has_bias, mean, rstd, sms=sms)
        for kernel, _, args, meta in forward + backward:
            label = (" ".join(f"{k}={v}" for k, v in meta.items()) + f" N={n} {str(dtype).removeprefix('torch.')}"
                     + ("" if sms is None else f" sms={sms}"))
            yield CompileSpec(kernel, label, args, meta, largest=largest)

    chunked_n = layer_norm.MAX_ONE_BLOCK_N + layer_norm.LOOP_BLOCK_N
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for block, _, one_block in layer_norm.launch_configs():
            n = block if one_block else chunked_n
            yield from specs(n, dtype, largest=dtype == torch.float32 and n in (layer_norm.MAX_ONE_BLOCK_N, chunked_n))
    for n in (1024, chunked_n):
        for affine in ((False, False), (True, False), (False, True)):
            yield from specs(n, torch.float16, *affine)
    for n in (1, 1023):
        yield from specs(n, torch.bfloat16)
    yield from specs(768, torch.bfloat16, sms=132)


def widths() -> dict[tuple, int]:
    """For each launch config (``block_config``'s answer), a row width that selects it: the widest
    of 1, 3, 7, ... 2^k - 1 that does (ragged where the block allows), and for the chunked loop
    one past the one-block limit."""
    layer_norm = _dispatch.kernel_module(NAME)
    widest = layer_norm.MAX_ONE_BLOCK_N
    chosen = {}
    for width in [2**k - 1 for k in range(1, widest.bit_length() + 1)] + [widest + 1]:
        chosen[layer_norm.block_config(width)] = width
    return chosen


def _config_label(config) -> str:
    return f"layer_norm BLOCK_N, warps, one block = {config}"


def fixed_configs() -> list[str]:
    """Every launch config: the row width picks it, not the autotuner."""
    return [_config_label(config) for config in _dispatch.kernel_module(NAME).launch_configs()]


def sanitizer_calls(dtype: torch.dtype) -> list[SanitizerCall]:
    """Five rows at each width of :func:`widths`, one per launch config."""
    return [SanitizerCall(f"layer_norm width {width}: BLOCK_N, warps, one block = {config}", dict(M=5, N=width),
                          covers=(_config_label(config),))
            for config, width in widths().items()]
