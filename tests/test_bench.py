"""The benchmarks: the naive baseline and plain PyTorch compute the same functions as the
references and fastgpt, and ``python -m bench`` runs end to end (tiny shapes; no timing is asserted)."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgpt_kernels
from bench import __main__ as bench_main
from bench import measure, ops, time_to_loss, train_step
from bench.naive import MultiHeadAttention, NaiveConfig, NaiveGPT
from bench.plain import PlainGPT
from conftest import DEVICE
from fastgpt.model import GPT, GPTConfig
from fastgpt_kernels import _dispatch, reference

ROOT = Path(__file__).resolve().parents[1]


def test_naive_attention_equals_the_reference_given_the_same_weights():
    torch.manual_seed(0)
    config = NaiveConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, n_embd=32, dropout=0.0)
    mha = MultiHeadAttention(config).eval()
    x = torch.randn(2, 13, 32)  # T=13 < block_size: the mask buffer is cropped
    heads = mha.heads

    def per_head(name):  # (B, H, T, hs) from each head's own projection weights
        return torch.stack([x @ getattr(h, name).weight.T for h in heads], dim=1)

    y = reference.attention_math(per_head("query"), per_head("key"), per_head("value"), causal=True)
    expected = mha.proj(y.transpose(1, 2).reshape(2, 13, 32))
    with torch.no_grad():
        torch.testing.assert_close(mha(x), expected, rtol=1e-5, atol=1e-6)
        with fastgpt_kernels.use_backend("torch"):
            fused = fastgpt_kernels.attention(per_head("query"), per_head("key"), per_head("value"), causal=True)
        torch.testing.assert_close(y, fused, rtol=1e-5, atol=1e-6)


def test_naive_heads_each_have_their_own_projections_and_mask():
    config = NaiveConfig(vocab_size=11, block_size=8, n_layer=1, n_head=3, n_embd=12)
    mha = MultiHeadAttention(config)
    assert len(mha.heads) == 3
    for head in mha.heads:
        assert [m.weight.shape for m in (head.key, head.query, head.value)] == [(4, 12)] * 3
        assert head.key.bias is None
        assert torch.equal(head.tril, torch.tril(torch.ones(8, 8)))


def test_naive_gpt_loss_starts_near_uniform_and_backpropagates():
    torch.manual_seed(0)
    model = NaiveGPT(NaiveConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(65, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 65)
    assert abs(loss.item() - torch.log(torch.tensor(65.0)).item()) < 0.2
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="n_embd \\(10\\) must be divisible by n_head \\(3\\)"):
        NaiveConfig(n_embd=10, n_head=3)


@pytest.mark.parametrize("op", ops.OPS)
def test_the_baseline_ops_compute_the_reference_functions(op):
    case = ops.OpCase(op, ops.SHAPES["tiny"][op])
    inputs = ops.make_inputs(case, "cpu")
    base, ref = ops.forward(case, ops.baseline(op), inputs), ops.forward(case, "reference", inputs)
    torch.testing.assert_close(base, ref, rtol=1e-4, atol=1e-5)
    wrt = [t for t in inputs.values() if t.requires_grad]
    grads = [torch.autograd.grad(out, wrt, torch.ones_like(out)) for out in (base, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_loss_is_compared_with_the_unfused_one_and_the_other_ops_with_the_naive_ones():
    assert {op: ops.providers(op) for op in ops.OPS} == {
        "attention": ("naive", "reference", "triton"), "layer_norm": ("naive", "reference", "triton"),
        "gelu_mlp": ("naive", "reference", "triton"), "linear_cross_entropy": ("unfused", "reference", "triton")}
    assert ops.SHAPES["quick"]["linear_cross_entropy"] == dict(M=512, C=768, V=50257)
    case = ops.OpCase("linear_cross_entropy", ops.SHAPES["tiny"]["linear_cross_entropy"])
    assert ops.flops(case, "forward+backward") == 3 * 2 * 64 * 32 * 128


def test_plain_pytorch_computes_fastgpts_function_given_the_same_weights():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    fast = GPT(config)
    plain = PlainGPT(config)
    assert set(plain.state_dict()) == set(fast.state_dict())
    plain.load_state_dict(fast.state_dict())
    assert plain.transformer.wte.weight is plain.lm_head.weight  # tied, as fastgpt's
    idx = torch.randint(50, (2, 13), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(50, (2, 13), generator=torch.Generator().manual_seed(2))
    with fastgpt_kernels.use_backend("torch"):
        fast_logits, fast_loss = fast(idx, targets, return_logits=True)
        fast_loss.backward()
    logits, loss = plain(idx, targets)
    loss.backward()
    torch.testing.assert_close(logits, fast_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, fast_loss, rtol=1e-5, atol=1e-6)
    fast_grads = dict(fast.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, fast_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_plain_pytorch_starts_from_fastgpts_initial_weights():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    fast = GPT(config)
    torch.manual_seed(0)
    plain = PlainGPT(config)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_gpt2_ratios_and_targets_pair_each_variant_with_its_baseline():
    rows = [{"variant": v, "batch": b, "context": 1024, "times_s": [t, t], "peak_memory_bytes": m}
            for b in (2, 4) for v, t, m in (("plain", 4.0, 1000), ("unfused", 4.0, 1000), ("fused", 2.0, 500),
                                            ("fused+mlp", 2.5, 400), ("fused+block", 3.0, 300 if b == 4 else 900))]
    ratios = train_step.gpt2_ratios(rows)
    by = {(r["batch"], r["variant"], r["baseline"]): r for r in ratios}
    assert len(ratios) == 2 * len(train_step.GPT2_PAIRS)
    assert by[4, "fused", "unfused"]["memory_ratio"] == 0.5 and by[4, "fused", "unfused"]["speedup"] == 2.0
    assert by[4, "fused+block", "plain"]["memory_ratio"] == 0.3
    assert bench_main.gpt2_target_lines(ratios) == [  # at the largest batch only
        "target: GPT-2 124M peak memory, fused <= 0.6 of unfused at B=4: 0.500, met",
        "target: GPT-2 124M peak memory, fused+block <= 0.35 of plain at B=4: 0.300, met"]
    rows[-1]["peak_memory_bytes"] = 400
    assert bench_main.gpt2_target_lines(train_step.gpt2_ratios(rows))[1].endswith("0.400, MISSED")


def test_bad_options_are_refused(capsys):
    for argv, message in ((["--rounds", "0"], "--rounds must be at least 1, got 0"),
                          (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
                          (["--quick", "--tiny"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exc:
            bench_main.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "OPENBLAS_NUM_THREADS": "1", **overrides}


@pytest.mark.slow
def test_python_m_bench_tiny_writes_every_figure_and_the_plots(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Step model (NOT measured" in proc.stdout and "fastgpt against plain (modelled)" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["cpu_cores"] >= 1

    op_rows = results["ops"]
    assert {(r["op"], r["provider"], r["pass"]) for r in op_rows} == {
        (o, p, s) for o in ops.OPS for p in ops.providers(o) for s in ops.PASSES}
    for r in op_rows:
        if r["provider"] == "triton" and not torch.cuda.is_available():
            assert r["status"] == ops.NEEDS_GPU  # never the interpreter or the fallback timed as "triton"
        else:
            assert r["status"] == "measured" and r["time_s"] > 0

    train = results["train_step"]
    assert {(r["side"], r["precision"]) for r in train} == {
        (side, p) for side in ("naive", "plain", "fastgpt") for p in ("float32", "bfloat16")}
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train)
    assert sum(r["default"] for r in train) == 2 * len({r["context"] for r in train})  # plain has none
    assert {(r["baseline"], r["compared"]) for r in results["train_step_ratios"]} == {
        ("naive", "defaults"), ("naive", "same precision"), ("plain", "same precision")}

    gpt2 = results["gpt2_step"]
    assert {(r["batch"], r["variant"]) for r in gpt2} == {(b, v) for b in train_step.GPT2_BATCHES["tiny"]
                                                          for v in ("plain", "unfused", "fused", "fused+mlp",
                                                                    "fused+block")}
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in gpt2)
    assert {(r["batch"], r["variant"], r["baseline"]) for r in results["gpt2_step_ratios"]} == {
        (b, v, base) for b in train_step.GPT2_BATCHES["tiny"] for v, base in train_step.GPT2_PAIRS}
    memory = {(r["batch"], r["variant"]): r["peak_memory_bytes"] for r in gpt2}
    for b in train_step.GPT2_BATCHES["tiny"]:  # recompute keeps less, even at the tiny shape
        assert memory[b, "fused+block"] <= memory[b, "fused+mlp"] < memory[b, "fused"], memory

    [gen] = results["generate"]
    assert gen["cache_tokens_per_s"] > 0 and gen["no_cache_tokens_per_s"] > 0 and gen["speedup"] > 0

    if _dispatch.NO_TRITON_REASON is None:
        host = results["host_overhead"]
        assert {(r["op"], r["direction"]) for r in host["host"]} == {(o, d) for o in ops.OPS
                                                                     for d in ("forward", "backward")}
        assert "Host overhead of the Triton path" in proc.stdout

    model = results["step_model"]
    assert set(model["builds"]) == {"naive", "plain", "fastgpt"} and model["shape"]["batch"] == 16
    assert (tmp_path / "train_step.png").stat().st_size > 0 and (tmp_path / "ops_speedup.png").stat().st_size > 0

    loss = results["time_to_loss"]
    assert set(loss["summary"]["recipes"]) == set(time_to_loss.RECIPES) and loss["seeds"] == 1
    assert all(len(evals) == 3 for seeds in loss["runs"].values() for evals in seeds)  # steps 0, 10, 20
    assert "Time to a target val loss" in proc.stdout and Path(loss["plot"]).stat().st_size > 0


def _evals(*losses, every=100, seconds_per_step=0.01):
    return [{"step": i * every, "seconds": i * every * seconds_per_step, "val_loss": v} for i, v in enumerate(losses)]


def test_time_to_loss_targets_each_seed_with_the_baselines_own_final_loss():
    slow = dict(seconds_per_step=0.02)
    runs = {"adamw": [_evals(3.0, 2.5, 2.2, 2.0), _evals(3.0, 2.6, 2.3, 2.1), _evals(3.0, 2.4, 1.9, 1.95)],
            "muon": [_evals(3.0, 2.0, 1.8, 1.7, **slow), _evals(3.0, 2.05, 1.9, 1.8, **slow),
                     _evals(3.0, 2.2, 1.9, 1.8, **slow)],
            "muon-wsd": [_evals(3.0, 2.9, 2.8, 2.7)] * 3}
    summary = time_to_loss.summarise(runs)
    assert summary["targets"] == [2.0, 2.1, 1.95] and summary["target"] == 2.0
    adamw, muon, wsd = (summary["recipes"][r] for r in ("adamw", "muon", "muon-wsd"))
    assert (adamw["steps"], adamw["steps_ratio"]) == (300, 1.0)  # seeds: 300, 300, and 200 (1.9 <= 1.95)
    assert adamw["reached"] == "3/3" and muon["reached"] == "3/3"
    assert muon["steps"] == 100 and muon["steps_ratio"] == 100 / 300  # seeds: 100, 100, 200
    assert muon["seconds"] == 2.0 and muon["seconds_ratio"] == 2.0 / 3.0  # twice the time per step
    assert muon["final_val_loss"] == 1.8
    assert wsd["reached"] == "0/3" and wsd["steps"] is None and wsd["steps_ratio"] is None
    assert time_to_loss.table(summary)[-1].split()[:3] == ["muon-wsd", "0/3", "-"]


@pytest.mark.slow
def test_pytest_benchmark_file_runs_every_op_provider_and_pass():
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/test_op_benchmarks.py", "-q", "--benchmark-disable",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=_env(FASTGPT_BENCH_SIZE="tiny"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = len(ops.OPS) * len(ops.PASSES)
    gpu = torch.cuda.is_available()
    expected = f"{3 * runs} passed" if gpu else f"{2 * runs} passed, {runs} skipped"
    assert expected in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(not _dispatch.INTERPRETED and not torch.cuda.is_available(), reason="needs the kernels to run")
@pytest.mark.parametrize("op", ops.OPS)
def test_the_triton_provider_is_recognised_only_when_the_kernel_launches(op, monkeypatch):
    case = ops.OpCase(op, ops.SHAPES["tiny"][op])
    inputs = ops.make_inputs(case, DEVICE)
    assert ops.launches_kernel(case, inputs)
    monkeypatch.setattr(_dispatch, "use_kernel", lambda *args: False)  # a silent fallback
    assert not ops.launches_kernel(case, inputs)


def test_peak_memory_counts_the_tensors_alive_at_once():
    cpu = torch.device("cpu")

    def two_alive():
        x = torch.ones(250_000)  # 1 MB
        y = x * 2  # 1 MB more while x lives
        return float(y[0])

    def one_at_a_time():
        return [float(torch.ones(250_000)[0]) for _ in range(3)]

    before = torch.ones(1_000_000)  # allocated before the call: not counted
    # Exact but for a few bytes of scalar temporaries.
    assert 2_000_000 <= measure.peak_memory(two_alive, cpu) < 2_000_100
    assert 1_000_000 <= measure.peak_memory(one_at_a_time, cpu) < 1_000_100
    assert measure.peak_memory(lambda: None, cpu) == 0
    del before


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the answer depends on its bfloat16 support")
def test_a_precision_the_device_does_not_time_cannot_be_profiled(tmp_path, capsys):
    assert bench_main.main(["--tiny", "--profile", "float16", "--out", str(tmp_path)]) == 2
    assert "--profile float16 is not available on this device" in capsys.readouterr().err


# --------------------------------------------------------------------------- the CUDA-only branches, on stand-ins


class FakeCuda:
    """Stand-ins for torch.cuda's events, synchronisation and memory counters: a GPU clock in
    milliseconds that the timed callables advance, and an allocator whose peak the callables raise."""

    def __init__(self, monkeypatch):
        self.clock_ms = 0.0
        self.calls = []
        self.allocated, self.peak = 1_000, 99_999  # a stale peak from before the call
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "an event that is not timing cannot be timed"
                self.at = None

            def record(self, stream=None):
                self.at = fake.clock_ms
                fake.calls.append("record")

            def synchronize(self):
                fake.calls.append("event.synchronize")

            def elapsed_time(self, end):
                return end.at - self.at  # milliseconds, as CUDA's

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.calls.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: self._reset())
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)

    def _reset(self):
        self.calls.append("reset")
        self.peak = self.allocated

    def work(self, ms: float, peak_bytes: int = 0):
        """A callable that runs ``ms`` on the GPU clock and briefly holds ``peak_bytes`` more."""
        def run():
            self.calls.append("fn")
            self.clock_ms += ms
            self.peak = max(self.peak, self.allocated + peak_bytes)
        return run


CUDA = torch.device("cuda")


def test_cuda_timing_reads_cuda_events_in_milliseconds(monkeypatch):
    fake = FakeCuda(monkeypatch)
    assert measure.time_call(fake.work(250.0), CUDA) == pytest.approx(0.25)
    assert fake.calls == ["record", "fn", "record", "event.synchronize"]  # waits for the end event before reading
    fns = {"slow": fake.work(30.0), "fast": fake.work(10.0)}
    times = measure.interleaved_times(fns, CUDA, rounds=3)
    assert times == {"slow": [pytest.approx(0.03)] * 3, "fast": [pytest.approx(0.01)] * 3}
    assert "synchronize" in fake.calls  # after the warm-up, before the first timed call


def test_cuda_peak_memory_is_the_allocators_peak_beyond_what_was_allocated_before(monkeypatch):
    fake = FakeCuda(monkeypatch)
    assert measure.peak_memory(fake.work(1.0, peak_bytes=5_000), CUDA) == 5_000
    assert fake.calls.index("reset") < fake.calls.index("fn")
    assert measure.memory_method(CUDA) == measure.CUDA_MEMORY_METHOD


def test_machine_info_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    info = measure.machine_info(CUDA)
    assert info["gpu"] == "NVIDIA H200" and info["device"] == "cuda"


@pytest.mark.parametrize("bf16, low", [(True, torch.bfloat16), (False, torch.float16)])
def test_a_gpu_times_its_training_precision_and_a_cpu_float32(monkeypatch, bf16, low):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert train_step.precisions(CUDA) == ["float32", str(low).removeprefix("torch.")]
    assert ops.timing_dtype(CUDA) == low  # the per-op dtype of python -m bench
    assert ops.timing_dtype(torch.device("cpu")) == torch.float32
    assert train_step.precisions(torch.device("cpu")) == ["float32", "bfloat16"]


class BackendProbe(torch.nn.Module):
    """A model that records the kernels' backend its forward runs under."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.seen = []

    def forward(self, idx, targets):
        self.seen.append(fastgpt_kernels.get_backend())
        return None, (self.weight * idx.float().mean()).sum()


def test_fastgpt_is_timed_under_auto_on_a_gpu_and_on_the_references_on_a_cpu():
    assert train_step.fastgpt_backend(CUDA) == "auto"
    assert train_step.fastgpt_backend(torch.device("cpu")) == "torch"
    idx = torch.ones(2, 4, dtype=torch.long)
    cases = ((CUDA, "fastgpt", None, "auto"), (torch.device("cpu"), "fastgpt", None, "torch"),
             (CUDA, "naive", None, "torch"), (CUDA, "fastgpt", "torch", "torch"), (CUDA, "naive", "triton", "torch"))
    for device, side, backend, expected in cases:
        model = BackendProbe()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step.step_fn(side, model, optimizer, idx, idx, "float32", device, backend)()
        assert model.seen == [expected], (device, side, backend)
        assert model.weight.grad is None and model.weight[0] < 1  # stepped, then gradients zeroed


def test_time_steps_times_the_first_step_apart_then_the_steady_ones(monkeypatch):
    fake = FakeCuda(monkeypatch)
    counted = []

    def step():
        counted.append(len(counted))
        fake.work(200.0 if len(counted) == 1 else 50.0, peak_bytes=2**20)()

    timing = train_step.time_steps(step, tokens=1000, device=CUDA, steps=3, warmup=2)
    assert len(counted) == 1 + 2 + 3 + 1  # first, warm-up, timed, peak memory
    assert timing["times_s"] == [pytest.approx(0.05)] * 3 and timing["time_s"] == pytest.approx(0.05)
    assert timing["tokens_per_s"] == pytest.approx(20_000)
    assert timing["peak_memory_bytes"] == 2**20 and timing["first_step_s"] >= 0
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        train_step.time_steps(step, 1000, CUDA, steps=0)


@pytest.mark.skipif(not _dispatch.INTERPRETED and not torch.cuda.is_available(), reason="needs the kernels to run")
def test_on_a_gpu_the_triton_provider_is_timed_only_when_its_kernel_launches(monkeypatch):
    case = ops.OpCase("layer_norm", ops.SHAPES["tiny"]["layer_norm"])
    inputs = ops.make_inputs(case, DEVICE)  # CPU tensors in the interpreter: the decision is the GPU's
    assert ops.unavailable(case, "triton", inputs, CUDA) is None
    assert ops.unavailable(case, "reference", inputs, CUDA) is None
    assert ops.unavailable(case, "triton", inputs, torch.device("cpu")) == ops.NEEDS_GPU
    wide = ops.make_inputs(ops.OpCase("layer_norm", ops.SHAPES["tiny"]["layer_norm"], torch.float64), DEVICE)
    assert "the Triton kernel cannot run" in ops.unavailable(case, "triton", wide, CUDA)
    monkeypatch.setattr(_dispatch, "use_kernel", lambda *args: False)  # a silent fallback
    assert ops.unavailable(case, "triton", inputs, CUDA) == "fastgpt_kernels.layer_norm did not launch its Triton kernel"


def test_a_gpu_row_names_the_side_that_served_each_op():
    from fastgpt_kernels import Decision

    decisions = [Decision("attention", (), "kernel", "raced", 1.0, 2.0), Decision("layer_norm", (), "torch", "raced", 2.0, 1.0),
                 Decision("gelu_mlp", (), "kernel", "raced", 1.0, 1.0), Decision("layer_norm", ("x",), "kernel", "raced", 1.0, 1.0)]
    assert train_step.served(decisions) == "auto: kernel serves attention, gelu_mlp, layer_norm; PyTorch serves layer_norm"
    assert train_step.served(decisions[:1]) == "auto: kernel serves attention"


def test_the_training_table_says_which_side_served_fastgpts_ops_under_auto():
    row = dict(context=256, batch=8, precision="bfloat16", default=True, tokens_per_s=1e4, mfu=0.1,
               peak_memory_bytes=2**20)
    rows = [{**row, "side": "fastgpt", "backend": "auto: kernel serves attention; PyTorch serves layer_norm"},
            {**row, "side": "plain", "backend": "torch (PyTorch's own ops)"}]
    lines = bench_main.train_table(rows, [])
    assert "fastgpt at T=256: auto: kernel serves attention; PyTorch serves layer_norm" in lines
    assert not any("torch (PyTorch's own ops)" in line for line in lines)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's /proc")
def test_process_memory_sums_a_command_and_its_children(capsys):
    from bench import process_memory

    # The parent holds 100 MB and its child 300 MB (written, so resident) for half a second, then exit 3.
    code = ("import subprocess, sys, time; a = bytearray(100_000_000); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(300_000_000); time.sleep(0.8)']); "
            "c.wait(); sys.exit(3)")
    assert process_memory.main(["--interval", "0.05", "--", sys.executable, "-c", code]) == 3
    out = capsys.readouterr().out
    rss_sum, pss_sum, one = (int(v) for v in re.search(r"RSS (\d+) MB, PSS (\d+) MB; peak RSS of one process (\d+)",
                                                       out).groups())
    assert rss_sum >= 400 and pss_sum >= 400 and 300 <= one < rss_sum, out
    with pytest.raises(SystemExit):
        process_memory.main([])
