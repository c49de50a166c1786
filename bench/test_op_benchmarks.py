"""Per-op benchmarks under pytest-benchmark: every op, provider and pass of :mod:`bench.ops`.

    pip install -e ".[bench]"
    python -m pytest bench/test_op_benchmarks.py --benchmark-group-by=group --benchmark-columns=min,median,rounds

``FASTGPT_BENCH_SIZE=tiny|quick|full|gpt2`` picks the shapes of :data:`bench.ops.SHAPES` (default
quick), in :func:`bench.ops.timing_dtype` (float32 on a CPU, bfloat16 on a GPU), where every call is
followed by a device synchronisation so the wall-clock timer sees the kernel's whole run. The
Triton provider runs only on a CUDA device (it is skipped, with the reason, elsewhere).
``python -m bench`` times the same calls interleaved round by round, which is steadier on a shared
machine; this file gives pytest-benchmark's statistics and its JSON/compare tooling.
"""
import os

import pytest
import torch

from bench import measure, ops

SIZE = os.environ.get("FASTGPT_BENCH_SIZE", "quick")
if SIZE not in ops.SHAPES:
    raise ValueError(f"FASTGPT_BENCH_SIZE must be one of {', '.join(ops.SHAPES)}, got {SIZE!r}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = ops.timing_dtype(DEVICE)


@pytest.mark.parametrize("pass_name", ops.PASSES)
@pytest.mark.parametrize("op, provider", [(op, provider) for op in ops.OPS for provider in ops.providers(op)])
def test_op(benchmark, op, provider, pass_name):
    case = ops.OpCase(op, ops.SHAPES[SIZE][op], DTYPE)
    inputs = ops.make_inputs(case, DEVICE)
    reason = ops.unavailable(case, provider, inputs, DEVICE)
    if reason:
        pytest.skip(reason)
    fn = ops.pass_fns(case, provider, inputs)[pass_name]

    def call():
        fn()
        measure.synchronize(DEVICE)

    benchmark.group = f"{op} {case.shape_label} {pass_name}"
    benchmark.extra_info.update(flops=ops.flops(case, pass_name), ideal_bytes=ops.ideal_bytes(case, pass_name),
                                dtype=str(DTYPE), device=str(DEVICE))
    benchmark(call)
