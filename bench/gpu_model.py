"""A model of GPU speed, not a measurement: bytes counted in Triton's interpreter, turned into roofline times.

For each fused op (attention, LayerNorm, GELU MLP), forward and backward, three byte counts:

``triton``     fastgpt's kernels run in Triton's interpreter with every masked load and store counted
               (:func:`kernels.tools.traffic.count_memory_traffic`); the figure used is the distinct
               bytes read plus the distinct bytes written: the compulsory traffic with a perfect L2.
``naive``      the unfused ops of :mod:`bench.ops` (per-head attention through (T, T) matrices,
               LayerNorm and GELU as separate elementwise ops), counted as every aten op reading its
               inputs once and writing its outputs once (:func:`kernels.tools.traffic.count_torch_traffic`).
``reference``  the PyTorch reference ops (fastgpt's fallback), counted the same way. PyTorch's
               attention and LayerNorm are single fused ops, so this row shows what those already save.

Each count, with the op's FLOPs, gives a roofline time ``max(bytes / bandwidth, FLOPs / peak)`` on an
H100 SXM and an H200 (dense 16-bit tensor-core peaks). Real kernels reach neither roof, launch
overheads are ignored and caches are not perfect: the times are lower bounds under stated
assumptions, and their ratios say where fusion saves memory traffic. No GPU was used.

Run through ``python -m bench`` (which starts it with the interpreter on), or directly with
``TRITON_INTERPRET=1 python -m bench.gpu_model``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench import ops
from fastgpt import perf
from kernels import _dispatch

# The GPUs the model is computed for (data-sheet figures from fastgpt.perf).
GPUS = {name: perf.gpu_named(name) for name in ("H100 SXM", "H200")}
# float16 runs in the interpreter; bfloat16 moves the same bytes and has the same tensor-core peak.
DTYPE = torch.float16
SHAPES = {
    "tiny": {"attention": dict(B=1, H=1, T=64, D=16), "layer_norm": dict(M=16, N=64),
             "gelu_mlp": dict(M=16, C=32, Hd=128)},
    # One (batch, head) of the lecture model's attention at context 1024; 256 tokens of its LayerNorm and MLP.
    "model": {"attention": dict(B=1, H=1, T=1024, D=64), "layer_norm": dict(M=256, N=384),
              "gelu_mlp": dict(M=256, C=384, Hd=1536)},
}
PROVIDERS = ("triton", "naive", "reference")


def model_flops(case: ops.OpCase, provider: str, pass_name: str) -> float:
    """FLOPs a provider performs: the naive attention computes every (T, T) score, whose backward is
    twice its forward (four matmuls, no recomputation); the fused ones skip the masked half."""
    if case.op == "attention" and provider == "naive":
        d = case.dims
        return perf.attention_flops(d["B"], d["H"], d["T"], d["D"], causal=False) * ops.PASS_FACTORS[pass_name]
    return ops.flops(case, pass_name) or 0.0


def count_bytes(case: ops.OpCase, provider: str, pass_name: str) -> dict:
    """Bytes moved by one ``pass_name`` ("forward" or "backward") of ``provider``: see the module doc."""
    from kernels.tools.traffic import count_memory_traffic, count_torch_traffic

    inputs = ops.make_inputs(case, "cpu")
    counter = count_memory_traffic if provider == "triton" else count_torch_traffic
    if pass_name == "backward":
        out = ops.forward(case, provider, inputs)
        grad_out = torch.randn_like(out)
    with counter() as traffic:
        if pass_name == "forward":
            ops.forward(case, provider, inputs)
        else:
            torch.autograd.grad(out, list(inputs.values()), grad_out)
    if provider == "triton":
        if traffic.out_of_bounds:
            raise AssertionError(f"{case.op} {pass_name}: {traffic.out_of_bounds} lanes outside every tensor")
        return {"bytes": traffic.distinct_loaded + traffic.distinct_stored,
                "requested_bytes": traffic.loaded + traffic.stored}
    return {"bytes": traffic.loaded + traffic.stored, "requested_bytes": traffic.loaded + traffic.stored}


def run(size: str, log=print) -> list[dict]:
    """One row per (op, pass, provider): bytes, FLOPs and the roofline time on each GPU of :data:`GPUS`."""
    if not _dispatch.INTERPRETED:
        raise RuntimeError("the GPU model counts bytes in Triton's interpreter: run it with TRITON_INTERPRET=1")
    rows = []
    for op in SHAPES[size]:  # the ops it models (not the fused loss)
        case = ops.OpCase(op, SHAPES[size][op], DTYPE)
        for pass_name in ("forward", "backward"):
            log(f"  model {op} {pass_name}")
            for provider in PROVIDERS:
                counted = count_bytes(case, provider, pass_name)
                work = model_flops(case, provider, pass_name)
                row = {"op": op, "shape": case.shape_label, "dtype": str(DTYPE).removeprefix("torch."),
                       "pass": pass_name, "provider": provider, **counted, "flops": work}
                for gpu, spec in GPUS.items():
                    row[f"{gpu} time_s"] = max(counted["bytes"] / spec.bandwidth, work / spec.bf16_flops)
                rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_model", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="model")
    parser.add_argument("--json", help="write the rows to this file (default: print them as JSON)")
    args = parser.parse_args(argv)
    try:
        rows = run(args.size, log=lambda text: print(text, file=sys.stderr, flush=True))
    except RuntimeError as exc:
        print(f"python -m bench.gpu_model: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(rows, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
