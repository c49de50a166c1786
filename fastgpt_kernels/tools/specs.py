"""The compile specs of every op: each kernel in each launch configuration it can run with.

``python -m fastgpt_kernels.tools.compile_report`` compiles these ahead of time for sm_80 and sm_90a. A spec
is built from the op module's own launch plan on example CPU tensors of real shapes and layouts,
so it is specialised exactly as a real launch would be. Specs marked ``largest`` are each kernel's
most demanding configurations (the largest tiles, head dimensions and flags, where registers and
shared memory peak): the reduced set compiled under every supported triton when the full set is
compiled under fewer.
"""
from __future__ import annotations

import dataclasses

import torch

from fastgpt_kernels import _tuning
from fastgpt_kernels._dispatch import OPS
from fastgpt_kernels.ops import attention, gelu_mlp, layer_norm, linear_cross_entropy
from fastgpt_kernels.tools.dropout import mask_launch

__all__ = ["OPS", "CompileSpec", "compile_specs"]


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One launch configuration of one kernel, described by the arguments a real launch passes."""
    kernel: object            # the @triton.jit function (or the .fn of an Autotuner)
    config: str               # human-readable config label, e.g. "BLOCK_N=1024 warps=4 fp16"
    args: tuple               # example positional args: CPU tensors of real dtypes/shapes, ints, floats
    kwargs: dict              # constexpr meta-parameters and launch options (num_warps, num_stages)
    uses_tensor_cores: bool = False  # its tl.dot must run on tensor cores (16-bit or TF32 operands)
    largest: bool = False     # among its kernel's most demanding specs (see the module docstring)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- LayerNorm


def layer_norm_specs():
    """Each launch configuration of ``block_config`` in each dtype, with weight and bias; every
    weight/bias combination for one one-block and the chunked configuration; the two
    specialisations the JIT makes for unusual widths (N=1, N not a multiple of 16); and the
    backward planned for a GPU with 132 multiprocessors (an H100), as a GPU plans it."""
    def specs(n, dtype, has_weight=True, has_bias=True, sms=None, largest=False):
        x = torch.empty(4 if sms is None else 4096, n, dtype=dtype)
        weight = torch.empty(n, dtype=dtype) if has_weight else None
        bias = torch.empty(n, dtype=dtype) if has_bias else None
        (y, mean, rstd), forward = layer_norm.forward_plan(x, weight, bias, 1e-5)
        _, backward = layer_norm.backward_plan(torch.empty_like(y), x, weight, has_bias, mean, rstd, sms=sms)
        for kernel, _, args, meta in forward + backward:
            label = (" ".join(f"{k}={v}" for k, v in meta.items()) + f" N={n} {_dtype_name(dtype)}"
                     + ("" if sms is None else f" sms={sms}"))
            yield CompileSpec(kernel, label, args, meta, largest=largest)

    chunked_n = layer_norm.MAX_ONE_BLOCK_N + layer_norm.LOOP_BLOCK_N
    configs = layer_norm.launch_configs()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for block, _, one_block in configs:
            n = block if one_block else chunked_n
            yield from specs(n, dtype, largest=dtype == torch.float32 and n in (layer_norm.MAX_ONE_BLOCK_N, chunked_n))
    for n in (1024, chunked_n):
        for affine in ((False, False), (True, False), (False, True)):
            yield from specs(n, torch.float16, *affine)
    for n in (1, 1023):
        yield from specs(n, torch.bfloat16)
    yield from specs(768, torch.bfloat16, sms=132)


# --------------------------------------------------------------------------- attention

SPEC_SHAPE = (2, 4, 1024)  # (B, H, T) of the example inputs the attention specs are specialised on
GPT2_HEAD_DIM = 64


def _qkv(head_dim: int, dtype: torch.dtype):
    """q, k, v: the three (B, H, T, D) slices of a fused qkv projection, as the GPT model passes them."""
    B, H, T = SPEC_SHAPE
    fused = torch.empty(B, T, 3, H, head_dim, dtype=dtype)
    return [fused[:, :, i].transpose(1, 2) for i in range(3)]


def attention_spec(kind, config, head_dim, dtype, causal=True, dropout_p=0.0, largest=False):
    """The spec of attention kernel ``kind`` ("fwd", "dkdv", "dq") launched with ``config``."""
    q, k, v = _qkv(head_dim, dtype)
    rng = attention.draw_rng_state("cpu") if dropout_p else None
    with _tuning.use_configs({f"attention.{kind}": config}):
        (o, lse), [launch] = attention.forward_plan(q, k, v, rng, causal, dropout_p, 0.125)
        if kind != "fwd":
            _, (_, dkdv, dq) = attention.backward_plan(torch.empty_like(o), q, k, v, o, lse, rng, causal,
                                                       dropout_p, 0.125)
            launch = dkdv if kind == "dkdv" else dq
    kernel, _, args, meta = launch
    label = (f"{kind} {_tuning.describe(config)} D={head_dim} {_dtype_name(dtype)}"
             f"{' causal' if causal else ''}{' dropout' if dropout_p else ''}")
    return CompileSpec(kernel, label, args, meta, uses_tensor_cores=True, largest=largest)


def attention_specs():
    """Each config at the smallest and largest padded head dimension it allows, causal, in float16;
    at the largest also not causal, bfloat16 and float32 (TF32 dots), and at GPT-2's D = 64 where
    that is not the largest; with dropout (where registers peak) at the
    largest head dimension it allows with dropout, float16 causal and not, and float32; the delta
    preprocessing kernel; and the tests' dropout-mask kernel."""
    for kind in attention.KINDS:
        for tile in attention._CONFIGS[kind]:
            config = tile.config
            d16, d32 = (attention.max_block_d(tile, dtype, False) for dtype in (torch.float16, torch.float32))
            d16_drop, d32_drop = (attention.max_block_d(tile, dtype, True) for dtype in (torch.float16, torch.float32))
            yield attention_spec(kind, config, 16, torch.float16)
            yield attention_spec(kind, config, d16, torch.float16)
            yield attention_spec(kind, config, d16, torch.float16, causal=False, largest=True)
            yield attention_spec(kind, config, d16, torch.bfloat16)
            yield attention_spec(kind, config, d32, torch.float32)
            yield attention_spec(kind, config, d32_drop, torch.float32, dropout_p=0.1, largest=True)
            yield attention_spec(kind, config, d16_drop, torch.float16, dropout_p=0.1, largest=True)
            yield attention_spec(kind, config, d16_drop, torch.float16, causal=False, dropout_p=0.1, largest=True)
            if d16 > GPT2_HEAD_DIM:  # registers do not grow monotonically with D: GPT-2's own too
                yield attention_spec(kind, config, GPT2_HEAD_DIM, torch.float16, causal=False)
                yield attention_spec(kind, config, GPT2_HEAD_DIM, torch.bfloat16)
            if d16_drop > GPT2_HEAD_DIM:
                yield attention_spec(kind, config, GPT2_HEAD_DIM, torch.float16, dropout_p=0.1)
                yield attention_spec(kind, config, GPT2_HEAD_DIM, torch.float16, causal=False, dropout_p=0.1)
    B, H, T = SPEC_SHAPE
    for width in (16, 128):
        o = torch.empty(B, H, T, width, dtype=torch.float16)
        kernel, _, args, meta = attention.preprocess_launch(o, torch.empty_like(o), torch.empty(B, H, T))
        yield CompileSpec(kernel, f"BLOCK_M={attention.PREPROCESS_BLOCK_M} warps=4 D={width} float16", args, meta,
                          largest=width == 128)
    kernel, _, args, meta = mask_launch(torch.empty(1, 4, T, T, dtype=torch.int8), attention.draw_rng_state("cpu"), 0.1)
    yield CompileSpec(kernel, f"BLOCK={meta['BLOCK']} warps=4", args, dict(meta, num_warps=4))


# --------------------------------------------------------------------------- GELU MLP

_FORWARD_ROLES = ("fc", "proj")
_BACKWARD_ROLES = ("dpre", "dproj_weight", "dfc_weight", "dx")


def gelu_mlp_specs():
    """Every GEMM launch of a training step in every config.

    For each config in float16 and float32 (TF32 dots, whose operands take twice the shared
    memory), the launches of the forward (keeping pre) and backward with both
    biases on 16-aligned widths; dfc_weight is left out because it specialises exactly like
    dproj_weight (same kernel, flags and stride divisibility). bfloat16 generates the same code as
    float16 but for the MMA instruction type: it is compiled for the first config. The float32
    launches are the ``largest``: twice the shared memory of the 16-bit ones. For the first
    config in float16 also the launches that change without biases and in the inference forward
    (pre not written), and all of them for widths C=100, H=400, whose rows are not 16-byte aligned
    (so no 128-bit loads are possible there); and the launches that read x with int64 offsets.
    Every config that split-K takes also writes a weight gradient's float32 partials in two K
    slices (float32 the largest), and the first config's launch of the slices' reduction.
    """
    def specs(config, dtype, m=256, c=128, h=512, biases=True, keep_pre=True, note="", roles=None, largest=False,
              wide=False, split=1):
        # wide: x's rows 2^24 elements apart, so a tile's own offsets pass 2^31 (never touched).
        x = torch.empty(m, 2**24 if wide else c, dtype=dtype)[:, :c]
        fc_weight, proj_weight = torch.empty(h, c, dtype=dtype), torch.empty(c, h, dtype=dtype)
        fc_bias = torch.empty(h, dtype=dtype) if biases else None
        proj_bias = torch.empty(c, dtype=dtype) if biases else None
        pins = {name: config for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight")}
        with _tuning.use_configs(pins):
            (out, pre), forward = gelu_mlp.forward_plan(x, fc_weight, fc_bias, proj_weight, proj_bias, keep_pre)
            launches = list(zip(_FORWARD_ROLES, forward))
            if keep_pre:
                _, backward = gelu_mlp.backward_plan(torch.empty_like(out), x, fc_weight, proj_weight, pre, biases,
                                                     biases, split=split)
                roles_in_order, role = iter(_BACKWARD_ROLES), None
                for launch in backward:  # a split weight gradient is followed by its reduction
                    reduces = launch[0] is gelu_mlp._gelu_mlp_bwd_split_reduce_kernel
                    role = f"{role} reduce" if reduces else next(roles_in_order)
                    if not role.startswith("dfc_weight") or wide:
                        launches.append((role, launch))
        for role, (kernel, _, args, meta) in launches:
            if roles is not None and role not in roles:
                continue
            gemm = kernel is not gelu_mlp._gelu_mlp_bwd_split_reduce_kernel
            launch = _tuning.describe(config) if gemm else f"SPLIT_K={meta['SPLIT_K']} BLOCK={meta['BLOCK']}"
            label = f"{role} {launch} {_dtype_name(dtype)}{note}"
            yield CompileSpec(kernel, label, args, meta, largest=largest, uses_tensor_cores=gemm)

    first = gelu_mlp.CONFIGS[0]
    for config in gelu_mlp.CONFIGS:
        yield from specs(config, torch.float16)
        yield from specs(config, torch.float32, largest=True)
    # A weight gradient in K slices writes float32 partials: another epilogue.
    for config in gelu_mlp.SPLIT_CONFIGS:
        split_roles = ("dproj_weight", "dproj_weight reduce") if config is first else ("dproj_weight",)
        for dtype in (torch.float16, torch.float32):
            yield from specs(config, dtype, note=" split-K", roles=split_roles, largest=dtype == torch.float32,
                             split=2)
    yield from specs(first, torch.bfloat16)
    # Only the launches these flags change: dpre and dx never take a bias, proj never keeps pre.
    yield from specs(first, torch.float16, biases=False, note=" no biases", roles=("fc", "proj", "dproj_weight"))
    yield from specs(first, torch.float16, keep_pre=False, note=" inference", roles=("fc",))
    yield from specs(first, torch.float16, c=100, h=400, note=" C=100 H=400")
    yield from specs(first, torch.float16, m=16, note=" int64 offsets", roles=("fc", "dfc_weight"), wide=True,
                     largest=True)
    yield from specs(first, torch.float16, m=16, note=" int64 offsets split-K", roles=("dfc_weight",), wide=True,
                     largest=True, split=2)


# --------------------------------------------------------------------------- linear + cross-entropy


def linear_cross_entropy_specs():
    """Every launch of a training step (the loss and its merge, dz, dx, dweight with dbias) in every
    config it can run with, float16, bfloat16 and float32; no bias, and int64 offsets (an x with a
    huge row stride) for the first config."""
    def specs(config, dtype, bias=True, wide=False, note="", largest=False):
        rows, width, vocab = (16 if wide else 256), 128, 1000
        # wide: x's rows 2^24 elements apart, so a tile's own offsets pass 2^31 (never touched).
        x = torch.empty(rows, 2**24 if wide else width, dtype=dtype)[:, :width]
        weight = torch.empty(vocab, width, dtype=dtype)
        b = torch.empty(vocab, dtype=dtype) if bias else None
        targets = torch.zeros(rows, dtype=torch.int64)
        allowed = linear_cross_entropy.logits_configs(dtype)
        dweight = linear_cross_entropy.DWEIGHT_CONFIGS
        pins = {"linear_cross_entropy.logits": config if config in allowed else allowed[0],
                "linear_cross_entropy.dx": config,
                "linear_cross_entropy.dweight": config if config in dweight else dweight[0]}
        with _tuning.use_configs(pins):
            (_, lse), loss = linear_cross_entropy.loss_plan(x, weight, b, targets, -100)
            dz, dlogits = linear_cross_entropy.dlogits_plan(x, weight, b, targets, lse, torch.empty(rows), -100)
            grads = (torch.empty_like(x), torch.empty(vocab, width), torch.empty(vocab) if bias else None)
            accumulate = linear_cross_entropy.accumulate_plan(dz, x, weight, *grads)
        roles = ("loss", "merge", "dlogits", "dx", "dweight")
        for role, (kernel, _, args, meta) in zip(roles, loss + dlogits + accumulate):
            tiled = role != "merge"
            if role in ("loss", "dlogits") and config not in allowed or role == "dweight" and config not in dweight:
                continue  # never launched with this config (in this dtype)
            if not tiled and (config is not first or wide or not bias or dtype != torch.float16):
                continue  # the merge does not depend on the config, the bias or x
            label = f"{role} {_tuning.describe(config) + ' ' if tiled else ''}{_dtype_name(dtype)}{note}"
            yield CompileSpec(kernel, label, args, meta, uses_tensor_cores=tiled, largest=largest and tiled)

    first = linear_cross_entropy.CONFIGS[0]
    for config in linear_cross_entropy.CONFIGS:
        yield from specs(config, torch.float16)
        yield from specs(config, torch.bfloat16)
        yield from specs(config, torch.float32, largest=True)
    yield from specs(first, torch.float16, bias=False, note=" no bias")
    yield from specs(first, torch.float16, wide=True, note=" int64 offsets", largest=True)


SPECS = {"layer_norm": layer_norm_specs, "attention": attention_specs, "gelu_mlp": gelu_mlp_specs,
         "linear_cross_entropy": linear_cross_entropy_specs}


def compile_specs(ops=OPS, largest_only: bool = False) -> list[CompileSpec]:
    """The specs of ``ops`` (all by default); only the ``largest`` ones when ``largest_only``."""
    specs = [spec for op in ops for spec in SPECS[op]()]
    return [s for s in specs if s.largest] if largest_only else specs
