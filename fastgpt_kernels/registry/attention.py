"""Attention's declaration (see :mod:`fastgpt_kernels.registry`): inputs, checks, cases, specs, calls."""
from __future__ import annotations

import torch

import fastgpt_kernels
from fastgpt_kernels import _dispatch, _tuning, reference
from fastgpt_kernels.registry import CompileSpec, SanitizerCall
from fastgpt_kernels.tools.checking import TF32_EPS, Check, check_op, grad_out, normal, tf32_in_force

NAME = "attention"


def inputs(B, H, T, D, dtype, *, layout=None, keys=None, device="cpu", seed=0) -> dict:
    """``{"qkv": (B, T, 3, H, D)}`` with ``layout="qkv"`` (the fused projection the GPT model slices),
    else contiguous ``q``, ``k``, ``v`` (B, H, T, D). With ``keys`` (T_K >= T) the queries are the
    last T of T_K positions."""
    if keys is not None and layout == "qkv":
        raise ValueError("a fused qkv layout has as many queries as keys: keys must be None")
    gen = torch.Generator().manual_seed(seed)
    fused = normal(gen, device, B, T if keys is None else keys, 3, H, D).to(device=device, dtype=dtype)
    if layout == "qkv":
        return {"qkv": fused.requires_grad_()}
    tensors = {name: fused[:, :, i].transpose(1, 2).contiguous() for i, name in enumerate("qkv")}
    tensors["q"] = tensors["q"][:, :, tensors["q"].shape[2] - T:].contiguous()
    return {name: t.requires_grad_() for name, t in tensors.items()}


def split_qkv(tensors: dict) -> tuple:
    """q, k, v from :func:`inputs`: the (B, H, T, D) slices of a fused qkv, or as given."""
    if "qkv" in tensors:
        return tuple(tensors["qkv"][:, :, i].transpose(1, 2) for i in range(3))
    return tensors["q"], tensors["k"], tensors["v"]


def scales(q, k, v, dout, causal, softmax_scale=None, keep=None, dropout_p=0.0) -> dict:
    """atol scales for attention's out, dq, dk and dv: the largest sums of |terms| (in float64).

    With P the attention weights, W = P * keep / (1 - p), dP = (dO V^T) * keep / (1 - p) and delta
    the row sums of P * dP, the kernels sum W |V| for out, W^T |dO| for dv, and P (|dP| + |delta|)
    times |K| (for dq) or |Q| (for dk): the subtraction dP - delta cancels at the size of its terms
    (exactly, when one key holds all the weight). One (T_Q, T_K) matrix per head at a time.
    """
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    found = dict.fromkeys(("out", "dq", "dk", "dv"), 0.0)
    future = torch.ones(T_Q, T_K, dtype=torch.bool, device=q.device).triu(T_K - T_Q + 1)
    for b in range(B):
        for h in range(H):
            qh, kh, vh, doh = (t[b, h].detach().double() for t in (q, k, v, dout))
            scores = scale * qh @ kh.T
            p = torch.softmax(scores.masked_fill(future, float("-inf")) if causal else scores, -1)
            dp = doh @ vh.T
            w = p
            if keep is not None:
                w = p * keep[b, h] / (1 - dropout_p)
                dp = dp * keep[b, h] / (1 - dropout_p)
            terms = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())
            for name, value in (("out", w @ vh.abs()), ("dv", w.T @ doh.abs()), ("dq", scale * terms @ kh.abs()),
                                ("dk", scale * terms.T @ qh.abs())):
                found[name] = max(found[name], value.max().item() if value.numel() else 0.0)
    return found


def checks(B, H, T, D, dtype, causal=True, *, dropout_p=0.0, softmax_scale=None, layout=None,
           keys=None, device="cpu", seed=0) -> list[Check]:
    """Attention forward and dq, dk, dv on :func:`inputs`, atol scales from :func:`scales`.

    ``layout="qkv"`` checks the fused gradient ``dqkv``. With ``dropout_p > 0`` the PyTorch runs
    apply the kernel's own keep-mask (drawn from the same seed and materialised by
    :func:`fastgpt_kernels.tools.dropout.dropout_mask`) through :func:`fastgpt_kernels.reference.attention_math`.
    """
    from fastgpt_kernels.tools import dropout  # launches a Triton kernel: imported only once Triton is known to work

    tensors = inputs(B, H, T, D, dtype, layout=layout, keys=keys, device=device, seed=seed)
    keep = None
    if dropout_p:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            rng = _dispatch.kernel_module(NAME).draw_rng_state(device)
            keep = dropout.dropout_mask(rng, (B, H, T, D), dropout_p, keys=keys)

    def attention(**given):
        q, k, v = split_qkv(given)
        if dropout_p and fastgpt_kernels.get_backend() != "triton":
            return reference.attention_math(q, k, v, causal, softmax_scale, keep, dropout_p)
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            torch.manual_seed(seed)  # with dropout, the kernel draws the seed that made ``keep``
            return fastgpt_kernels.attention(q, k, v, causal, dropout_p, softmax_scale)

    q, k, v = split_qkv(tensors)
    found = scales(q, k, v, grad_out((B, H, T, D), dtype, seed).to(device), causal, softmax_scale, keep, dropout_p)
    if layout == "qkv":
        found["dqkv"] = max(found["dq"], found["dk"], found["dv"])
    if tf32_in_force(dtype, device):
        found = {name: value * TF32_EPS / torch.finfo(dtype).eps for name, value in found.items()}
    label = (f"({B},{H},{T},{D}){f' T_K={keys}' if keys else ''}{' causal' if causal else ''}"
             f"{f' p={dropout_p}' if dropout_p else ''}"
             f"{f' scale={softmax_scale}' if softmax_scale else ''}{f' {layout}' if layout else ''}")
    return check_op(NAME, label, attention, tensors, seed, found)


def verify_cases(big: bool, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """Every length and head dimension in float16, a few of each in the other dtypes; not causal;
    a softmax scale and the fused qkv layout; fewer queries than keys (new tokens against a cache:
    one query, and a ragged block); dropout, causal and not."""
    lengths, widths = ((1, 17, 100, 257), (16, 48, 128)) if dtype == torch.float16 else ((17, 100), (48,))
    found = [((1, 2, T, 64, dtype), {}) for T in lengths]
    found += [((1, 2, 100, D, dtype, False), {}) for D in widths]
    found.append(((1, 2, 64, 64, dtype, False), {"softmax_scale": 0.3, "layout": "qkv"}))
    found += [((1, 2, T, 64, dtype), {"keys": 100}) for T in (1, 37)]
    found += [((2, 2, 64, 32, dtype, causal), {"dropout_p": 0.1}) for causal in (True, False)]
    if big:
        found.append(((4, 12, 1024, 64, dtype), {"layout": "qkv"}))
        found.append(((2, 16, 2048, 128, dtype), {"dropout_p": 0.1}))
    return found


def unsupported(B, H, T, D, dtype, *args, layout=None, keys=None, **kwargs) -> str | None:
    """Why the kernels do not take the :func:`checks` case (decided on meta tensors)."""
    tensors = inputs(B, H, T, D, dtype, layout=layout, keys=keys, device="meta")
    return _dispatch.kernel_module(NAME).why_unsupported(*split_qkv(tensors))


BENCH_SHAPES = {"tiny": dict(B=1, H=2, T=32, D=16), "quick": dict(B=1, H=6, T=1024, D=64),
                "full": dict(B=4, H=6, T=1024, D=64), "gpt2": dict(B=16, H=12, T=1024, D=64)}


def step_dims(tokens: int, width: int, heads: int, vocab: int) -> dict:
    """The dims of attention in a GPT step of ``tokens`` tokens: sequences of up to 1024."""
    T = min(tokens, 1024)
    return dict(B=max(1, tokens // T), H=heads, T=T, D=width // heads)


def bench_inputs(dims: dict, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """:func:`inputs`: contiguous q, k and v of shape (B, H, T, D)."""
    return inputs(dims["B"], dims["H"], dims["T"], dims["D"], dtype, device=device, seed=seed)


DETERMINISM = (("attention", {"causal": True}), ("attention dropout 0.1", {"causal": True, "dropout_p": 0.1}))

SPEC_SHAPE = (2, 4, 1024)  # (B, H, T) of the example inputs the compile specs are specialised on
GPT2_HEAD_DIM = 64


def _spec_qkv(head_dim: int, dtype: torch.dtype):
    """q, k, v: the three (B, H, T, D) slices of a fused qkv projection, as the GPT model passes them."""
    B, H, T = SPEC_SHAPE
    fused = torch.empty(B, T, 3, H, head_dim, dtype=dtype)
    return [fused[:, :, i].transpose(1, 2) for i in range(3)]


def _spec(kind, config, head_dim, dtype, causal=True, dropout_p=0.0, largest=False) -> CompileSpec:
    """The spec of attention kernel ``kind`` ("fwd", "dkdv", "dq") launched with ``config``."""
    attention = _dispatch.kernel_module(NAME)
    q, k, v = _spec_qkv(head_dim, dtype)
    rng = attention.draw_rng_state("cpu") if dropout_p else None
    with _tuning.use_configs({f"attention.{kind}": config}):
        (o, lse), [launch] = attention.forward_plan(q, k, v, rng, causal, dropout_p, 0.125)
        if kind != "fwd":
            _, (_, dkdv, dq) = attention.backward_plan(torch.empty_like(o), q, k, v, o, lse, rng, causal,
                                                       dropout_p, 0.125)
            launch = dkdv if kind == "dkdv" else dq
    kernel, _, args, meta = launch
    label = (f"{kind} {_tuning.describe(config)} D={head_dim} {str(dtype).removeprefix('torch.')}"
             f"{' causal' if causal else ''}{' dropout' if dropout_p else ''}")
    return CompileSpec(kernel, label, args, meta, uses_tensor_cores=True, largest=largest)


def compile_specs():
    """Each config at the smallest and largest padded head dimension it allows, causal, in float16;
    at the largest also not causal, bfloat16 and float32 (TF32 dots), and at GPT-2's D = 64 where
    that is not the largest; with dropout (where registers peak) at the
    largest head dimension it allows with dropout, float16 causal and not, and float32; the delta
    preprocessing kernel; and the tests' dropout-mask kernel."""
    from fastgpt_kernels.tools.dropout import mask_launch

    attention = _dispatch.kernel_module(NAME)
    for kind in attention.KINDS:
        for tile in attention.TILES[kind]:
            config = tile.config
            d16, d32 = (attention.max_block_d(tile, dtype, False) for dtype in (torch.float16, torch.float32))
            d16_drop, d32_drop = (attention.max_block_d(tile, dtype, True) for dtype in (torch.float16, torch.float32))
            yield _spec(kind, config, 16, torch.float16)
            yield _spec(kind, config, d16, torch.float16)
            yield _spec(kind, config, d16, torch.float16, causal=False, largest=True)
            yield _spec(kind, config, d16, torch.bfloat16)
            yield _spec(kind, config, d32, torch.float32)
            yield _spec(kind, config, d32_drop, torch.float32, dropout_p=0.1, largest=True)
            yield _spec(kind, config, d16_drop, torch.float16, dropout_p=0.1, largest=True)
            yield _spec(kind, config, d16_drop, torch.float16, causal=False, dropout_p=0.1, largest=True)
            if d16 > GPT2_HEAD_DIM:  # registers do not grow monotonically with D: GPT-2's own too
                yield _spec(kind, config, GPT2_HEAD_DIM, torch.float16, causal=False)
                yield _spec(kind, config, GPT2_HEAD_DIM, torch.bfloat16)
            if d16_drop > GPT2_HEAD_DIM:
                yield _spec(kind, config, GPT2_HEAD_DIM, torch.float16, dropout_p=0.1)
                yield _spec(kind, config, GPT2_HEAD_DIM, torch.float16, causal=False, dropout_p=0.1)
    B, H, T = SPEC_SHAPE
    for width in (16, 128):
        o = torch.empty(B, H, T, width, dtype=torch.float16)
        kernel, _, args, meta = attention.preprocess_launch(o, torch.empty_like(o), torch.empty(B, H, T))
        yield CompileSpec(kernel, f"BLOCK_M={attention.PREPROCESS_BLOCK_M} warps=4 D={width} float16", args, meta,
                          largest=width == 128)
    kernel, _, args, meta = mask_launch(torch.empty(1, 4, T, T, dtype=torch.int8), attention.draw_rng_state("cpu"), 0.1)
    yield CompileSpec(kernel, f"BLOCK={meta['BLOCK']} warps=4", args, dict(meta, num_warps=4))


def fixed_configs() -> list[str]:
    """None: the autotuner chooses every attention launch config."""
    return []


def sanitizer_calls(dtype: torch.dtype) -> list[SanitizerCall]:
    """T = 100 (ragged for every tile, long enough that none is pruned as too large), every config
    the kernels allow: causal at D = 64, and not causal with dropout at D = 32."""
    attention = _dispatch.kernel_module(NAME)
    T = 100
    found = []
    for causal, dropout, D in ((True, 0.0, 64), (False, 0.1, 32)):
        allowed = {f"attention.{kind}": attention.configs(kind, D, dtype, T, dropout > 0) for kind in attention.KINDS}
        found.append(SanitizerCall(f"attention causal={causal} dropout={dropout} D={D}", dict(B=1, H=2, T=T, D=D),
                                   {"causal": causal, "dropout_p": dropout}, allowed))
    return found
