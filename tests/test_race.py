"""fastgpt_kernels._race: under ``auto`` the faster of kernel and PyTorch serves each shape class.

The race runs only on CUDA tensors; here the tests let it run on CPU tensors (the kernels in Triton's
interpreter) and replace its timer with a stand-in that says who wins, so the decisions are the
tests' to choose. One test runs the real timer (the wall clock on a CPU).
"""
import json

import pytest
import torch

import fastgpt_kernels
from conftest import run_python
from fastgpt_kernels import _dispatch, _io, _race, reference
from fastgpt_kernels.ops import attention as attn
from fastgpt_kernels.ops import layer_norm as ln

pytestmark = pytest.mark.skipif(_dispatch.NO_TRITON_REASON is not None, reason="needs the kernels")


class StandInTimer:
    """``time_side`` that runs each side once (so both must work) and reports ``ms[side]``."""

    def __init__(self, kernel_ms: float, torch_ms: float):
        self.ms = {"kernel": kernel_ms, "torch": torch_ms}
        self.timed = []

    def __call__(self, fn, device, side):
        fn()
        self.timed.append(side)
        return self.ms[side]


@pytest.fixture
def race(monkeypatch):
    """Races on CPU tensors too, no decisions carried in or out; returns a function that installs a
    stand-in timer."""
    monkeypatch.setattr(_race, "RACE_DEVICE_TYPES", ("cuda", "cpu"))
    _race.forget()
    yield lambda kernel_ms, torch_ms: _install(monkeypatch, StandInTimer(kernel_ms, torch_ms))
    _race.forget()


def _install(monkeypatch, timer):
    monkeypatch.setattr(_race, "time_side", timer)
    return timer


@pytest.fixture
def served(monkeypatch):
    """Records which side ran each LayerNorm and attention call: "kernel" or "torch"."""
    calls = []
    for module, name, side in ((ln, "layer_norm", "kernel"), (attn, "attention", "kernel"),
                               (reference, "layer_norm", "torch"), (reference, "attention", "torch")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, side=side: calls.append(side) or real(*a))
    return calls


def layer_norm_call(rows=100, width=64, requires_grad=True):
    x = torch.randn(rows, width, requires_grad=requires_grad)
    w, b = torch.ones(width, requires_grad=requires_grad), torch.zeros(width, requires_grad=requires_grad)
    return fastgpt_kernels.layer_norm(x, w, b)


def test_pytorch_serves_a_shape_class_it_is_faster_on_and_the_decision_is_reused(race, served):
    timer = race(kernel_ms=2.0, torch_ms=1.0)
    layer_norm_call()
    assert timer.timed == ["kernel", "torch"]
    [decision] = fastgpt_kernels.backend_decisions()
    assert (decision.op, decision.served, decision.why) == ("layer_norm", "torch", "raced")
    assert decision.speedup == 0.5
    assert "PyTorch serves (raced): kernel 2.000 ms, PyTorch 1.000 ms (0.50x)" in decision.describe()
    served.clear()
    layer_norm_call(rows=120)  # the same class: 100 and 120 rows both round up to 128
    assert served == ["torch"] and timer.timed == ["kernel", "torch"]  # no second race
    layer_norm_call(rows=300)  # another class: raced again
    assert timer.timed == ["kernel", "torch"] * 2
    with torch.no_grad():  # forward only: a class of its own
        layer_norm_call(rows=120)
    assert len(fastgpt_kernels.backend_decisions()) == 3


@pytest.mark.parametrize("kernel_ms, torch_ms, side", [(1.0, 2.0, "kernel"), (1.0, 0.98, "kernel"),
                                                       (1.0, 0.96, "torch")])
def test_the_kernel_is_kept_unless_pytorch_is_faster_by_more_than_the_margin(race, served, kernel_ms, torch_ms,
                                                                             side):
    race(kernel_ms, torch_ms)
    layer_norm_call()
    served.clear()
    layer_norm_call()
    assert served == [side] and fastgpt_kernels.backend_decisions()[0].served == side


def test_forced_backends_and_cpu_tensors_never_race(monkeypatch, served):
    _race.forget()
    timer = _install(monkeypatch, StandInTimer(2.0, 1.0))
    for backend, side in (("triton", "kernel"), ("torch", "torch"), ("auto", "kernel")):  # auto: a CPU tensor
        served.clear()
        with fastgpt_kernels.use_backend(backend):
            layer_norm_call()
        assert served == [side], backend
    assert timer.timed == [] and fastgpt_kernels.backend_decisions() == []


def test_the_race_leaves_the_callers_random_numbers_as_they_were(race):
    """With dropout the race draws masks of its own; the caller's stream must not move, or a run that
    raced and one that read its decision from disk would train differently."""
    race(kernel_ms=1.0, torch_ms=2.0)
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    raced = fastgpt_kernels.attention(q, k, v, dropout_p=0.2)
    after_race = torch.get_rng_state()
    torch.manual_seed(5)
    decided = fastgpt_kernels.attention(q, k, v, dropout_p=0.2)  # decided: no race
    assert torch.equal(after_race, torch.get_rng_state())
    assert torch.equal(raced, decided)


def test_deterministic_algorithms_exclude_pytorchs_attention_but_not_layer_norm(race, served):
    timer = race(kernel_ms=2.0, torch_ms=1.0)
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        fastgpt_kernels.attention(q, q, q)
        layer_norm_call()
    finally:
        torch.use_deterministic_algorithms(False)
    attention, layer_norm = fastgpt_kernels.backend_decisions()
    assert attention.served == "kernel" and attention.why.startswith("deterministic algorithms")
    assert layer_norm.served == "torch" and timer.timed == ["kernel", "torch"]  # only LayerNorm raced
    served.clear()
    fastgpt_kernels.attention(q, q, q)  # without the flag: a class of its own, raced
    assert served[-1] == "torch" and timer.timed == ["kernel", "torch"] * 2


def test_no_race_while_torch_compile_traces(race):
    timer = race(kernel_ms=2.0, torch_ms=1.0)
    weight, bias = torch.ones(64), torch.zeros(64)
    compiled = torch.compile(lambda x: fastgpt_kernels.layer_norm(x, weight, bias) * 2, fullgraph=True)
    x = torch.randn(100, 64)
    torch.testing.assert_close(compiled(x), torch.nn.functional.layer_norm(x, (64,), weight, bias) * 2)
    assert timer.timed == [] and fastgpt_kernels.backend_decisions() == []  # the kernel, undecided


def test_under_torch_compile_a_decision_made_before_is_used(race, monkeypatch):
    race(kernel_ms=2.0, torch_ms=1.0)
    weight, bias = torch.ones(64), torch.zeros(64)
    x = torch.randn(100, 64)
    with torch.no_grad():
        fastgpt_kernels.layer_norm(x, weight, bias)  # eager: raced, PyTorch serves this class
    real = reference.layer_norm
    monkeypatch.setattr(reference, "layer_norm", lambda *a: real(*a) + 1)  # which side the graph holds
    compiled = torch.compile(lambda x: fastgpt_kernels.layer_norm(x, weight, bias), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), torch.nn.functional.layer_norm(x, (64,), weight, bias) + 1)
    assert len(fastgpt_kernels.backend_decisions()) == 1


def test_the_real_timer_races_on_a_cpu(monkeypatch, race):
    """The race as it runs on a GPU, with the wall clock for CUDA events: both sides run forward and
    backward WARMUP + REPEATS times, and a decision comes out."""
    monkeypatch.setattr(_race, "REPEATS", 3)
    calls = {"kernel": 0, "torch": 0}
    for module, side in ((ln, "kernel"), (reference, "torch")):
        real = module.layer_norm
        monkeypatch.setattr(module, "layer_norm", lambda *a, real=real, side=side: calls.__setitem__(
            side, calls[side] + 1) or real(*a))
    layer_norm_call(rows=8, width=16)
    [decision] = fastgpt_kernels.backend_decisions()
    assert decision.why == "raced" and decision.kernel_ms > 0 and decision.torch_ms > 0
    side = decision.served
    assert calls == {"kernel": _race.WARMUP + 3 + (side == "kernel"), "torch": _race.WARMUP + 3 + (side == "torch")}


RACE_SCRIPT = """
    import json, sys, torch, fastgpt_kernels
    from fastgpt_kernels import _race
    _race.RACE_DEVICE_TYPES = ("cuda", "cpu")
    def stand_in(fn, device, side):
        if {forbid}:
            raise SystemExit("raced again")
        fn()
        return {{"kernel": 2.0, "torch": 1.0}}[side]
    _race.time_side = stand_in
    x = torch.randn(100, 64, requires_grad=True)
    fastgpt_kernels.layer_norm(x, torch.ones(64), torch.zeros(64)).sum().backward()
    print(json.dumps([(d.served, d.why) for d in fastgpt_kernels.backend_decisions()]))
"""


@pytest.mark.slow
def test_decisions_are_kept_on_disk_for_the_next_process(tmp_path):
    env = dict(FASTGPT_AUTOTUNE_CACHE=str(tmp_path), TRITON_INTERPRET="1")
    first = run_python(RACE_SCRIPT.format(forbid=False), **env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == [["torch", "raced"]]
    [path] = tmp_path.glob("backends-*.json")
    assert f"torch-{torch.__version__}" in path.name.replace("_", "-").replace("+", "-") or "torch" in path.name
    second = run_python(RACE_SCRIPT.format(forbid=True), **env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout) == [["torch", "read from the disk cache"]]
    path.write_text("{damaged")  # raced again, and rewritten
    third = run_python(RACE_SCRIPT.format(forbid=False), **env)
    assert json.loads(third.stdout) == [["torch", "raced"]] and json.loads(path.read_text())


DDP_SCRIPT = """
    import json, os, sys, torch, torch.distributed as dist, fastgpt_kernels
    from fastgpt_kernels import _race
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
    _race.RACE_DEVICE_TYPES = ("cuda", "cpu")
    def stand_in(fn, device, side):  # the ranks disagree about who is faster
        fn()
        return {{"kernel": 2.0, "torch": 1.0}}[side] if rank == 0 else {{"kernel": 1.0, "torch": 2.0}}[side]
    _race.time_side = stand_in
    x = torch.randn(100, 64, requires_grad=True)
    fastgpt_kernels.layer_norm(x, torch.ones(64), torch.zeros(64)).sum().backward()
    print(json.dumps([(d.served, d.why, d.torch_ms) for d in fastgpt_kernels.backend_decisions()]))
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_under_torch_distributed_every_rank_takes_rank_0s_decision(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(store=tmp_path / "store")))
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1", "FASTGPT_AUTOTUNE_CACHE": "off"}
    ranks = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), [err for _, err in outputs]
    rank0, rank1 = (json.loads(out) for out, _ in outputs)
    assert rank0 == [["torch", "raced", 1.0]]
    assert rank1 == [["torch", "rank 0's decision", 1.0]]


def test_a_cache_that_cannot_be_written_keeps_the_decision_in_memory(race, monkeypatch, tmp_path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    monkeypatch.setenv(_io.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_io, "_unwritable", [])
    _io.cache_directory.cache_clear()
    race(kernel_ms=2.0, torch_ms=1.0)
    try:
        with pytest.warns(RuntimeWarning, match="autotuning cache cannot be written"):
            layer_norm_call()
    finally:
        _io.cache_directory.cache_clear()
    assert fastgpt_kernels.backend_decisions()[0].served == "torch"


@pytest.mark.parametrize("mode", ["mlp", "block"])
def test_a_race_inside_a_recomputed_block_keeps_its_own_graph(race, mode):
    # The first forward of a recomputed block runs under torch.utils.checkpoint's saved-tensor hooks;
    # the race's own backward must not unpack through them (that would recompute the block inside
    # the race, and race again).
    from fastgpt.model import GPT, GPTConfig

    race(kernel_ms=1.0, torch_ms=2.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    grads = {}
    for recompute in ("none", mode):
        model.recompute = recompute
        _race.forget()  # race again, this time inside the recomputed part
        torch.manual_seed(1)
        _, loss = model(idx, targets)
        loss.backward()
        grads[recompute] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        assert {d.why for d in fastgpt_kernels.backend_decisions()} == {"raced"}
    for a, b in zip(grads["none"], grads[mode]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
