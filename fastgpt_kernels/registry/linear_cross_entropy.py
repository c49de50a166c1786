"""The fused lm_head + cross-entropy's declaration (see :mod:`fastgpt_kernels.registry`): inputs,
checks, cases, specs, calls."""
from __future__ import annotations

import torch

import fastgpt_kernels
from fastgpt_kernels import _dispatch, _tuning, reference
from fastgpt_kernels.registry import CompileSpec, SanitizerCall
from fastgpt_kernels.tools.checking import (IGNORE_INDEX, TF32_EPS, Check, check_op, grad_out, leaf, normal,
                                            tf32_in_force)

NAME = "linear_cross_entropy"


def inputs(rows, width, vocab, dtype, bias=True, ignored="some", *, view=None, device="cpu", seed=0) -> dict:
    """x (rows, width), weight (vocab, width) scaled to unit logits, targets (rows,), bias (vocab,)
    when ``bias``. ``ignored``: ``"none"``, ``"some"`` (every third target from the second on is
    ``IGNORE_INDEX``) or ``"all"``. ``view``: ``"strided"`` passes x as every other column of a wider
    buffer and weight transposed (column-major)."""
    gen = torch.Generator().manual_seed(seed)
    x = normal(gen, device, rows, width * (2 if view == "strided" else 1))[:, ::2 if view == "strided" else 1]
    weight = normal(gen, device, vocab, width) / width**0.5
    if view == "strided":
        weight = weight.t().contiguous().t()
    targets = torch.randint(max(vocab, 1), (rows,), generator=gen)
    if ignored != "none":
        targets[slice(None) if ignored == "all" else slice(1, None, 3)] = IGNORE_INDEX
    return {"x": leaf(x, device, dtype), "weight": leaf(weight, device, dtype),
            "targets": targets.to("meta" if torch.device(device).type == "meta" else device),
            "bias": leaf(normal(gen, device, vocab) if bias else None, device, dtype)}


def checks(rows, width, vocab, dtype, bias=True, ignored="some", reduction="mean", *,
           view=None, fallback=False, device="cpu", seed=0) -> list[Check]:
    """The fused loss and the gradients of x, weight and bias on :func:`inputs`, against the unfused
    ``F.cross_entropy(F.linear(x, weight, bias).float(), ...)``. With ``fallback`` the chunked
    PyTorch version (:func:`fastgpt_kernels.reference.linear_cross_entropy`) is checked instead of the kernels."""
    tensors = inputs(rows, width, vocab, dtype, bias, ignored, view=view, device=device, seed=seed)
    targets = tensors["targets"]

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
    x64, w64 = tensors["x"].detach().cpu().double(), tensors["weight"].detach().cpu().double()
    b64 = None if tensors["bias"] is None else tensors["bias"].detach().cpu().double()
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
    return check_op(NAME, label, fused, tensors, seed, scales, pytorch_fn=unfused)


def verify_cases(big: bool, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """(rows, C, V): one row, V = 1, odd widths, GPT-2's vocabulary; every reduction; no bias;
    ignored targets, some and all; a strided x and column-major weight."""
    found = [((rows, width, vocab, dtype), {})
             for rows, width, vocab in ((1, 16, 17), (7, 100, 1), (300, 100, 1000), (7, 16, 50257))]
    found.append(((33, 48, 300, dtype, False, "none", "sum"), {}))
    found.append(((33, 48, 300, dtype, True, "all", "none"), {}))
    found.append(((17, 64, 100, dtype), {"view": "strided"}))
    if big:
        found.append(((8192, 768, 50257, dtype), {}))
    return found


def unsupported(rows, width, vocab, dtype, bias=True, ignored="some", *args, view=None, **kwargs) -> str | None:
    """Why the kernels do not take the :func:`checks` case (decided on meta tensors)."""
    tensors = inputs(rows, width, vocab, dtype, bias, ignored, view=view, device="meta")
    return _dispatch.kernel_module(NAME).why_unsupported(*(tensors[k] for k in ("x", "weight", "bias", "targets")))


GPT2_VOCAB = 50257
# GPT-2's width and vocabulary, with as many rows as a CPU computes in seconds at "quick" and
# "full", and a GPT-2 step's 16384 rows for GPUs.
BENCH_SHAPES = {"tiny": dict(M=64, C=32, V=128), "quick": dict(M=512, C=768, V=GPT2_VOCAB),
                "full": dict(M=2048, C=768, V=GPT2_VOCAB), "gpt2": dict(M=16384, C=768, V=GPT2_VOCAB)}


def step_dims(tokens: int, width: int, heads: int, vocab: int) -> dict:
    """The dims of the loss in a GPT step of ``tokens`` tokens: one row per token."""
    return dict(M=tokens, C=width, V=vocab)


def bench_inputs(dims: dict, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """:func:`inputs` as a GPT's loss has them: M rows of width C, vocabulary V, no bias (left out of
    the arguments), no ignored target."""
    tensors = inputs(dims["M"], dims["C"], dims["V"], dtype, bias=False, ignored="none", device=device, seed=seed)
    return {name: t for name, t in tensors.items() if t is not None}


DETERMINISM = (("linear_cross_entropy", {}),)


def compile_specs():
    """Every launch of a training step (the loss and its merge, dz, dx, dweight with dbias) in every
    config it can run with, float16, bfloat16 and float32; no bias, and int64 offsets (an x with a
    huge row stride) for the first config."""
    loss_module = _dispatch.kernel_module(NAME)
    first = loss_module.CONFIGS[0]

    def specs(config, dtype, bias=True, wide=False, note="", largest=False):
        rows, width, vocab = (16 if wide else 256), 128, 1000
        # wide: x's rows 2^24 elements apart, so a tile's own offsets pass 2^31 (never touched).
        x = torch.empty(rows, 2**24 if wide else width, dtype=dtype)[:, :width]
        weight = torch.empty(vocab, width, dtype=dtype)
        b = torch.empty(vocab, dtype=dtype) if bias else None
        targets = torch.zeros(rows, dtype=torch.int64)
        allowed = loss_module.logits_configs(dtype)
        dweight = loss_module.DWEIGHT_CONFIGS
        pins = {"linear_cross_entropy.logits": config if config in allowed else allowed[0],
                "linear_cross_entropy.dx": config,
                "linear_cross_entropy.dweight": config if config in dweight else dweight[0]}
        with _tuning.use_configs(pins):
            (_, lse), loss = loss_module.loss_plan(x, weight, b, targets, -100)
            dz, dlogits = loss_module.dlogits_plan(x, weight, b, targets, lse, torch.empty(rows), -100)
            grads = (torch.empty_like(x), torch.empty(vocab, width), torch.empty(vocab) if bias else None)
            accumulate = loss_module.accumulate_plan(dz, x, weight, *grads)
        roles = ("loss", "merge", "dlogits", "dx", "dweight")
        for role, (kernel, _, args, meta) in zip(roles, loss + dlogits + accumulate):
            tiled = role != "merge"
            if role in ("loss", "dlogits") and config not in allowed or role == "dweight" and config not in dweight:
                continue  # never launched with this config (in this dtype)
            if not tiled and (config is not first or wide or not bias or dtype != torch.float16):
                continue  # the merge does not depend on the config, the bias or x
            label = f"{role} {_tuning.describe(config) + ' ' if tiled else ''}{str(dtype).removeprefix('torch.')}{note}"
            yield CompileSpec(kernel, label, args, meta, uses_tensor_cores=tiled, largest=largest and tiled)

    for config in loss_module.CONFIGS:
        yield from specs(config, torch.float16)
        yield from specs(config, torch.bfloat16)
        yield from specs(config, torch.float32, largest=True)
    yield from specs(first, torch.float16, bias=False, note=" no bias")
    yield from specs(first, torch.float16, wide=True, note=" int64 offsets", largest=True)


def fixed_configs() -> list[str]:
    """None: the autotuner chooses every tiled launch's config (the merge has one launch)."""
    return []


def sanitizer_calls(dtype: torch.dtype) -> list[SanitizerCall]:
    """100 rows and V = 300, ragged for every tile, every config (the logits kernel those of its dtype)."""
    loss_module = _dispatch.kernel_module(NAME)
    allowed = {name: configs for name, configs in _tuning.candidate_configs().items() if name.startswith(f"{NAME}.")}
    allowed[f"{NAME}.logits"] = loss_module.logits_configs(dtype)
    return [SanitizerCall(NAME, dict(M=100, C=64, V=300), allowed=allowed)]
