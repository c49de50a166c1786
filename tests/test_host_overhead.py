"""bench.host_overhead: the Triton path's host cost per op, measured with every kernel launch stubbed."""
import pytest
import torch

import fastgpt_kernels
from bench import host_overhead
from fastgpt_kernels import _dispatch, _tuning

pytestmark = pytest.mark.skipif(not _dispatch.INTERPRETED, reason="stubs the launches of Triton's interpreter")


def test_stubbed_launches_count_the_launches_compute_nothing_and_restore_everything():
    from triton.runtime.interpreter import InterpretedFunction

    run, can_time, cache_file = InterpretedFunction.run, _tuning._autotuner_can_time, _tuning.cache_file
    x = torch.randn(4, 32)
    with host_overhead.stubbed_launches() as launches, fastgpt_kernels.use_backend("triton"):
        y = fastgpt_kernels.layer_norm(x, None)
        assert len(launches) == 1
        assert _tuning.cache_file() is None
    assert not torch.allclose(y, torch.nn.functional.layer_norm(x, (32,)))  # the kernel never ran
    assert (InterpretedFunction.run, _tuning._autotuner_can_time, _tuning.cache_file) == (run, can_time, cache_file)
    assert all("_bench" not in vars(t.tuner) for t in _tuning.tunables().values())
    assert all(not t.chosen for t in _tuning.tunables().values())  # the made-up choices are gone
    torch.testing.assert_close(fastgpt_kernels.layer_norm(x, None), torch.nn.functional.layer_norm(x, (32,)))


@pytest.mark.slow
def test_a_tiny_run_measures_every_op_both_ways_and_counts_a_steps_launches():
    results = host_overhead.in_child("tiny")
    host = {(r["op"], r["direction"]): r for r in results["host"]}
    ops = ("layer_norm", "attention", "gelu_mlp", "linear_cross_entropy")
    assert set(host) == {(op, d) for op in ops for d in ("forward", "backward")}
    assert [host[op, "forward"]["launches"] for op in ops] == [1, 1, 2, 5]  # LCE: loss, merge, dz, dx, dW
    assert host["attention", "backward"]["launches"] == 3  # delta, dK/dV, dQ
    assert all(r["host_us"] > 0 and r["floor_us"] > 0 for r in results["host"])
    assert all(r["beyond_floor_us"] == pytest.approx(r["host_us"] - r["floor_us"]) for r in results["host"])
    assert [r["op"] for r in results["torch_backend"]] == list(ops)
    step = results["step_launches"]
    assert step["total"] == step["forward"] + step["backward"] == sum(step["by_kernel"].values())
    n_layer = 2  # the tiny model: two LayerNorms per block and the final one
    assert step["by_kernel"]["_layer_norm_fwd_kernel"] == 2 * n_layer + 1
    assert step["by_kernel"]["_attention_fwd_kernel"] == n_layer
    assert "\n".join(host_overhead.table(results)).count("\n") > 10


@pytest.mark.slow
def test_it_refuses_to_run_without_the_interpreter():
    from conftest import run_python

    proc = run_python("import sys; from bench import host_overhead; sys.exit(host_overhead.main(['--size', 'tiny']))",
                      TRITON_INTERPRET=None)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET=1" in proc.stderr
