"""The GELU MLP's declaration (see :mod:`fastgpt_kernels.registry`): inputs, checks, cases, specs, calls."""
from __future__ import annotations

import torch

import fastgpt_kernels
from fastgpt_kernels import _dispatch, _tuning
from fastgpt_kernels.registry import CompileSpec, SanitizerCall
from fastgpt_kernels.tools.checking import TF32_EPS, Check, check_op, grad_out, leaf, normal, tf32_in_force

NAME = "gelu_mlp"


def inputs(rows, width, hidden, dtype, biases=(True, True), *, device="cpu", view=None, seed=0) -> dict:
    """x (rows, width), the weights (hidden, width) and (width, hidden) scaled to unit outputs, the
    biases ``biases`` says are present. ``view``: ``"strided"`` (x is every other column of a wider
    buffer) or ``"transposed"`` (both weights stored column-major)."""
    gen = torch.Generator().manual_seed(seed)
    x = normal(gen, device, rows, width * (2 if view == "strided" else 1))[:, ::2 if view == "strided" else 1]
    params = {
        "fc_weight": normal(gen, device, hidden, width) / width**0.5,
        "fc_bias": normal(gen, device, hidden) if biases[0] else None,
        "proj_weight": normal(gen, device, width, hidden) / hidden**0.5,
        "proj_bias": normal(gen, device, width) if biases[1] else None,
    }
    if view == "transposed":
        params = {k: (v.t().contiguous().t() if v is not None and v.dim() == 2 else v) for k, v in params.items()}
    return {"x": leaf(x, device, dtype), **{k: leaf(v, device, dtype) for k, v in params.items()}}


def checks(rows, width, hidden, dtype, biases=(True, True), *, device="cpu", view=None, seed=0) -> list[Check]:
    """GELU MLP forward and the gradients of x, both weights and both biases on :func:`inputs`. The
    weight and bias gradients sum over rows: their atol scale is the largest sum of |terms|."""
    tensors = inputs(rows, width, hidden, dtype, biases, device=device, view=view, seed=seed)
    label = f"({rows}, {width}) H={hidden}" + ("" if all(biases) else f" biases={biases}") + (f" {view}" if view else "")
    x64, w1, b1, w2, b2 = (None if t is None else t.detach().cpu().double() for t in tensors.values())
    pre = (x64 @ w1.T + (0 if b1 is None else b1)).requires_grad_()
    act = torch.nn.functional.gelu(pre, approximate="tanh")
    dout = grad_out((rows, width), dtype, seed).double()
    dact = dout @ w2
    dpre = torch.autograd.grad(act, pre, dact)[0]
    act = act.detach()
    magnitude = {"dfc_weight": dpre.abs().T @ x64.abs(), "dfc_bias": dpre.abs().sum(0),
                 "dproj_weight": dout.abs().T @ act.abs(), "dproj_bias": dout.abs().sum(0)}
    if tf32_in_force(dtype, device):
        # TF32 dots round their operands to 10 mantissa bits: every GEMM's error is about
        # TF32_EPS x its sum of |terms|, and flows on into the GEMMs after it (|gelu'| < 1.2, |gelu''| < 0.8).
        terms = x64.abs() @ w1.abs().T + (0 if b1 is None else b1.abs())
        act_err = act.abs() + 1.2 * terms
        dpre_err = dpre.abs() + 1.2 * (dout.abs() @ w2.abs()) + 0.8 * dact.abs() * terms
        magnitude = {"out": act_err @ w2.abs().T + (0 if b2 is None else b2.abs()), "dx": dpre_err @ w1.abs(),
                     "dfc_weight": dpre_err.T @ x64.abs(), "dfc_bias": dpre_err.sum(0),
                     "dproj_weight": dout.abs().T @ act_err, "dproj_bias": dout.abs().sum(0)}
        magnitude = {k: v * (TF32_EPS / torch.finfo(torch.float32).eps) if k != "dproj_bias" else v
                     for k, v in magnitude.items()}
    scales = {k: v.max().item() if v.numel() else 0.0 for k, v in magnitude.items()}
    return check_op(NAME, label, fastgpt_kernels.gelu_mlp, tensors, seed, scales)


def verify_cases(big: bool, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """(rows, C, H): H = 4C, H not a multiple of 16 (200), odd C (100), one row and many; no
    biases; a strided x and column-major weights."""
    shapes = [(1, 16, 64), (7, 48, 192), (100, 100, 400), (257, 128, 200)]
    if big:
        shapes += [(8192, 768, 3072), (2048, 1600, 6400)]
    found = [((rows, width, hidden, dtype), {}) for rows, width, hidden in shapes]
    found.append(((33, 48, 192, dtype, (False, False)), {}))
    found.append(((17, 64, 256, dtype), {"view": "strided"}))
    found.append(((17, 64, 256, dtype), {"view": "transposed"}))
    return found


def unsupported(*args, view=None, **kwargs) -> str | None:
    """Why the kernels do not take the :func:`checks` case (decided on meta tensors)."""
    tensors = inputs(*args, view=view, device="meta")
    return _dispatch.kernel_module(NAME).why_unsupported(*tensors.values())


BENCH_SHAPES = {"tiny": dict(M=64, C=32, Hd=128), "quick": dict(M=1024, C=384, Hd=1536),
                "full": dict(M=4096, C=384, Hd=1536), "gpt2": dict(M=16384, C=768, Hd=3072)}


def step_dims(tokens: int, width: int, heads: int, vocab: int) -> dict:
    """The dims of the MLP in a GPT step of ``tokens`` tokens: hidden width 4C."""
    return dict(M=tokens, C=width, Hd=4 * width)


def bench_inputs(dims: dict, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """:func:`inputs` for M rows of width C, hidden width Hd."""
    return inputs(dims["M"], dims["C"], dims["Hd"], dtype, device=device, seed=seed)


DETERMINISM = (("gelu_mlp", {}),)

_FORWARD_ROLES = ("fc", "proj")
_BACKWARD_ROLES = ("dpre", "dproj_weight", "dfc_weight", "dx")


def compile_specs():
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
    gelu_mlp = _dispatch.kernel_module(NAME)

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
            label = f"{role} {launch} {str(dtype).removeprefix('torch.')}{note}"
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


def fixed_configs() -> list[str]:
    """None: the autotuner chooses every GEMM's config (the split-K reduction has one launch)."""
    return []


def sanitizer_calls(dtype: torch.dtype) -> list[SanitizerCall]:
    """Every config of the MLP's autotuned GEMMs at 100 rows; and at 8192 rows, where on a GPU the
    weight gradients run in two K slices and a reduction (``_gemm.split_k``), every split config."""
    gelu_mlp = _dispatch.kernel_module(NAME)
    allowed = {name: configs for name, configs in _tuning.candidate_configs().items() if name.startswith("gelu_mlp.")}
    return [SanitizerCall("gelu_mlp", dict(M=100, C=64, Hd=256), allowed=allowed),
            SanitizerCall("gelu_mlp split-K", dict(M=8192, C=64, Hd=256),
                          allowed=dict(allowed, **{"gelu_mlp.dweight": gelu_mlp.SPLIT_CONFIGS}))]
