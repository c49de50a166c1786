"""The GPU report's stages (see :mod:`bench.gpu_report`): each runs in its own child process
(:func:`run_stage`), records its figures as it goes, and ends itself at its deadline."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from bench.gpu_report import children
from bench.gpu_report.children import ROOT, child_env, end_group, last_record, run_group, start_group
from fastgpt_kernels import _processes

# The kernel test files the ``tests`` stage runs on the GPU; a new op's test file belongs here.
TEST_FILES = ("tests/test_layer_norm.py", "tests/test_attention.py", "tests/test_gelu_mlp.py",
              "tests/test_linear_cross_entropy.py", "tests/test_tuning.py", "tests/test_dispatch.py",
              "tests/test_traffic.py")
# ``--tiny``: the tests whose names hold this (one per op: the determinism tests).
TINY_TESTS = "deterministic"

# compute-sanitizer's exit status when it found errors (--error-exitcode), told apart from the target's.
SANITIZER_ERROR_EXIT = 86
SANITIZER_TOOLS = ("memcheck", "racecheck")

TAIL_CHARS = 4000  # of each stage's output kept in report.json


class Skipped(Exception):
    """A stage cannot run on this machine; the message says why."""


# --------------------------------------------------------------------------- one stage, in its child process


@dataclasses.dataclass
class StageRun:
    """What a stage's code gets: its size, its deadline, and where its figures go.

    ``deadline`` is the wall-clock time (``time.time()``) at which the stage ends itself (and the
    parent kills it soon after): a stage that runs processes of its own (the sanitizer's) ends
    them before it. :meth:`record` appends the figures so far as one JSON line to ``result``, so
    that a stage ended at its deadline still leaves what it had done (the parent reads the last
    complete line). ``part``: which share of the warm-up's compiles a warm-up worker makes.
    """

    tiny: bool
    deadline: float
    result: Path | None
    figures: dict = dataclasses.field(default_factory=dict)
    part: tuple[int, int] = (0, 1)

    def record(self, **figures) -> None:
        """Add ``figures`` to the stage's figures and append them all to the result file."""
        self.figures.update(figures)
        if self.result is not None:
            with open(self.result, "a") as f:
                f.write(json.dumps(self.figures, default=str) + "\n")

    def seconds_left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.time()

    @functools.cached_property
    def workdir(self) -> Path:
        """A folder for the stage's own files: next to its result file, else a temporary one."""
        return self.result.parent if self.result is not None else Path(tempfile.mkdtemp(prefix="gpu_report."))


def low_precision(device: torch.device) -> str:
    """The precision the report runs the kernels in: the low precision a training step takes on
    ``device`` (:func:`bench.train_step.precisions`: bfloat16, or float16 on a GPU without it)."""
    from bench import train_step

    return train_step.precisions(device)[-1]


def kernel_device() -> torch.device:
    """The device the kernels run on here: the GPU, else the CPU in Triton's interpreter (with the
    bfloat16 shim, as the interpreter's own bfloat16 arithmetic is wrong)."""
    from fastgpt_kernels import _dispatch

    if _dispatch.NO_TRITON_REASON:
        raise RuntimeError(f"the Triton kernels cannot run: {_dispatch.NO_TRITON_REASON}")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not _dispatch.INTERPRETED:
        raise RuntimeError("no CUDA device and Triton's interpreter is off: run the stage through "
                           "python -m bench.gpu_report, which sets TRITON_INTERPRET=1 for it")
    from fastgpt_kernels.tools import bf16_shim

    bf16_shim.install_bf16_shim()
    return torch.device("cpu")


# --------------------------------------------------------------------------- env


def find_sanitizer() -> str | None:
    """The ``compute-sanitizer`` executable: on PATH, else in the CUDA toolkit (CUDA_HOME, /usr/local/cuda)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(Path(home) / "bin" / "compute-sanitizer", os.X_OK):
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def gpu_info(device: torch.device) -> dict:
    """The CUDA ``device``: name, compute capability, memory, multiprocessors, bfloat16 support."""
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported()}


def nvidia_smi() -> dict | None:
    """``nvidia-smi``'s output, its driver and CUDA versions; None where it is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"output": f"nvidia-smi did not run: {exc}", "driver": None, "cuda": None}
    text = proc.stdout + proc.stderr
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return {"output": text, "driver": driver and driver.group(1), "cuda": cuda and cuda.group(1)}


def sdpa_backends() -> list[str]:
    """The SDPA backends this torch enables by default, in its order of preference: what PyTorch's
    attention (the ops stage's reference) picks from for a GPU's inputs."""
    flags = {"cudnn": "cudnn_sdp_enabled", "flash": "flash_sdp_enabled", "efficient": "mem_efficient_sdp_enabled",
             "math": "math_sdp_enabled"}
    return [name for name, flag in flags.items() if getattr(torch.backends.cuda, flag, lambda: False)()]


def stage_env(run: StageRun) -> str | None:
    """Versions, the GPU and its tools; fails when the Triton kernels cannot run at all."""
    import numpy

    from bench import measure
    from fastgpt_kernels import _dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = measure.machine_info(device)
    smi = nvidia_smi()
    run.record(python=machine["python"], torch=machine["torch"], triton=machine["triton"], numpy=numpy.__version__,
               platform=machine["platform"], cpu=machine["cpu"], cpu_cores=machine["cpu_cores"],
               cuda_runtime=torch.version.cuda, gpu=gpu_info(device) if device.type == "cuda" else None,
               driver=smi and smi["driver"], driver_cuda=smi and smi["cuda"],
               nvidia_smi=smi["output"] if smi else "nvidia-smi is not installed",
               compute_sanitizer=find_sanitizer(), kernels_interpreted=_dispatch.INTERPRETED,
               triton_problem=_dispatch.NO_TRITON_REASON, sdpa_backends=sdpa_backends())
    print(json.dumps({k: v for k, v in run.figures.items() if k != "nvidia_smi"}, indent=1))
    if smi:
        print(smi["output"])
    return f"the Triton kernels cannot run: {_dispatch.NO_TRITON_REASON}" if _dispatch.NO_TRITON_REASON else None


# --------------------------------------------------------------------------- verify


def verify_cases(tiny: bool) -> list:
    """The verification cases: the GPU grid in every dtype; ``tiny``, the first float16 case of each op."""
    from fastgpt_kernels.tools import verify

    if not tiny:
        return verify.cases("gpu", list(verify.DTYPES.values()))
    found = {}
    for case in verify.cases("cpu", [torch.float16]):
        found.setdefault(case.op, case)
    return list(found.values())


def stage_verify(run: StageRun) -> str | None:
    """:mod:`fastgpt_kernels.tools.verify`'s cases (:func:`verify_cases`), case by case: a crash is one
    case's failure."""
    device = kernel_device()
    passed, failures, skipped, errors = 0, [], [], []
    for case in verify_cases(run.tiny):
        reason = case.why_unsupported()
        if reason is not None:  # the dispatcher would run PyTorch's op: nothing to verify
            skipped.append(f"{case.describe()}: {reason}")
        else:
            try:
                checks = case.run(str(device))  # as verify's own command passes it
            except Exception as exc:  # one case's crash (a compile error, say) must not hide the others
                errors.append(f"{case.describe()}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            else:
                for check in checks:
                    print(check, flush=True)
                passed += sum(c.passed for c in checks)
                failures += [str(c) for c in checks if not c.passed]
        run.record(device=str(device), passed=passed, failed=len(failures), skipped=len(skipped),
                   errors=len(errors), failures=failures, error_cases=errors, skipped_cases=skipped)
    if failures or errors:
        return f"{len(failures)} tensors out of bound, {len(errors)} cases crashed"
    return None if passed else "nothing was checked"


# --------------------------------------------------------------------------- compiles: counted, and made ahead


def count_compiles(figures: dict) -> None:
    """From now on, count in ``figures["compiles"]`` the kernels Triton compiles in this process and
    those it finds in its disk cache, with the seconds they took (the JIT's request to the
    compiler's answer). Triton's interpreter compiles nothing: the counts stay 0 there."""
    import triton

    counts = figures.setdefault("compiles", {"compiled": 0, "from_disk": 0, "seconds": 0.0})
    started: list[float] = []

    def before(*args, **kwargs):  # knobs.runtime.jit_cache_hook: a true value would skip the compile
        started.append(time.perf_counter())
        return False

    def after(*, cache_hit: bool, **kwargs):  # knobs.compilation.listener
        counts["from_disk" if cache_hit else "compiled"] += 1
        if started:
            counts["seconds"] = round(counts["seconds"] + time.perf_counter() - started.pop(), 3)

    triton.knobs.runtime.jit_cache_hook = before
    triton.knobs.compilation.listener = after


WARMUP_WORKERS = 8  # processes compiling side by side (each holds a CUDA context and a GPT-2 step's tensors)


@contextlib.contextmanager
def compile_only(part: tuple[int, int]):
    """Within the block the ops compile their kernels and launch none (their outputs hold garbage):
    each launch awaiting tuning compiles ``part`` of the configs the op allows
    (:func:`fastgpt_kernels._tuning.compile_launch`). Yields ``[kernels compiled or found]``."""
    from fastgpt_kernels import _dispatch, _tuning

    asked = [0]

    def run(plan):
        outputs, launches = plan
        for launch in launches:
            asked[0] += _tuning.compile_launch(launch, part)
        return outputs

    modules = [_dispatch.kernel_module(op) for op in _dispatch.OPS]
    launchers = [module.run for module in modules]
    for module in modules:
        module.run = run
    try:
        yield asked
    finally:
        for module, launcher in zip(modules, launchers):
            module.run = launcher


def warmup_calls(tiny: bool, device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """``(label, call)``: every op call of the later stages' kernels, forward and backward, on the
    ``triton`` backend: the determinism and ops stages' cases, the train stage's steps, verify's
    cases. The tests stage's many small shapes compile within its own budget."""
    import fastgpt_kernels
    from bench import ops, train_step

    dtype = getattr(torch, low_precision(device))
    calls = []
    for label, case, fn in determinism_cases("tiny" if tiny else "gpt2", dtype):
        def backward(case=case, fn=fn):
            inputs = ops.make_inputs(case, device)
            with fastgpt_kernels.use_backend("triton"):
                out = fn(**inputs)
                torch.autograd.grad(out, [t for t in inputs.values() if t.requires_grad], torch.ones_like(out))
        calls.append((f"{label} {case.shape_label}", backward))
    settings = train_settings(tiny)
    for batch in settings["batches"]:
        for dropout in TRAIN_DROPOUTS:
            def step(batch=batch, dropout=dropout):
                model, optimizer = train_step.build("fastgpt", settings["shape"], settings["context"], dropout, device)
                idx, targets = train_step.random_batch(settings["shape"], settings["context"], batch, device)
                train_step.step_fn("fastgpt", model, optimizer, idx, targets, low_precision(device), device,
                                   "triton")()
            calls.append((f"train B={batch} dropout={dropout}", step))
    for case in verify_cases(tiny):
        if case.why_unsupported() is None:
            calls.append((case.describe(), functools.partial(case.run, str(device))))
    return calls


def stage_warmup_worker(run: StageRun) -> str | None:
    """One warm-up worker: every call of :func:`warmup_calls` in :func:`compile_only` mode, compiling
    its part of the configs."""
    device = kernel_device()
    failed = []
    with compile_only(run.part) as asked:
        for label, call in warmup_calls(run.tiny, device):
            try:
                call()
            except Exception as exc:  # a kernel that does not compile: the stages that launch it will say
                failed.append(f"{label}: {type(exc).__name__}: {exc}")
            run.record(asked=asked[0], failed=failed)
            gc.collect()
    return "; ".join(failed) or None


def stage_warmup(run: StageRun) -> str | None:
    """:data:`WARMUP_WORKERS` warm-up workers side by side, each compiling a share of the configs
    the later stages launch, into Triton's disk cache: the later stages then load their kernels."""
    from fastgpt_kernels import _dispatch

    if _dispatch.INTERPRETED:
        raise Skipped("Triton's interpreter compiles nothing")
    workers = max(1, min(WARMUP_WORKERS, os.cpu_count() or 1))
    procs = []
    for i in range(workers):
        result = run.workdir / f"warmup-{i}.result.jsonl"
        result.unlink(missing_ok=True)
        command = [*children.stage_command("warmup-worker", run.tiny, run.deadline - 2, result),
                   "--part", f"{i}/{workers}"]
        procs.append((result, start_group(command, child_env(cuda=True), run.workdir / f"warmup-{i}.log")))
    totals = {"workers": workers, "asked": 0, "compiled": 0, "from_disk": 0, "seconds": 0.0, "failed": []}
    for result, proc in procs:
        try:
            proc.wait(timeout=max(1.0, run.seconds_left()))
        except subprocess.TimeoutExpired:
            end_group(proc)
        figures = last_record(result)
        compiles = figures.get("compiles", {})
        totals["asked"] += figures.get("asked", 0)
        for name in ("compiled", "from_disk", "seconds"):
            totals[name] = round(totals[name] + compiles.get(name, 0), 3)
        totals["failed"] += figures.get("failed", [])
        if proc.returncode != 0 and not figures.get("failed"):
            totals["failed"].append(f"worker {result.stem}: {figures.get('reason') or f'exit {proc.returncode}'}")
        run.record(warmup=totals)
    return f"{len(totals['failed'])} warm-up call(s) failed to compile" if totals["failed"] else None


# --------------------------------------------------------------------------- tests

_PYTEST_LINE = re.compile(r"^(?P<test>\S+::.+?) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def stage_tests(run: StageRun) -> str | None:
    """:data:`TEST_FILES` under pytest, each outcome recorded as it comes (a timeout keeps the counts so far)."""
    command = [sys.executable, "-m", "pytest", *TEST_FILES, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider"]
    if run.tiny:
        command += ["-k", TINY_TESTS]
    print(" ".join(command), flush=True)
    counts = dict.fromkeys(("passed", "failed", "error", "skipped", "xfail", "xpass"), 0)
    failing = []
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        match = _PYTEST_LINE.match(line)
        if match:
            outcome = match["outcome"].lower()
            counts[outcome] += 1
            if outcome in ("failed", "error"):
                failing.append(f"{match['test']} {match['outcome']}")
            run.record(command=" ".join(command), **counts, failing=failing)
    rc = proc.wait()
    run.record(command=" ".join(command), **counts, failing=failing, exit_code=rc)
    if rc:
        return f"pytest exited with {rc}: {counts['failed']} failed, {counts['error']} errors"
    return None


# --------------------------------------------------------------------------- determinism


def determinism_cases(size: str, dtype: torch.dtype) -> list[tuple[str, object, Callable]]:
    """``(label, bench.ops.OpCase, function)`` for every call each op's declaration lists in
    ``DETERMINISM`` (attention with and without dropout), at its benchmark shape of ``size``."""
    import fastgpt_kernels
    from bench import ops
    from fastgpt_kernels import registry

    return [(label, ops.OpCase(declared.NAME, declared.BENCH_SHAPES[size], dtype),
             functools.partial(getattr(fastgpt_kernels, declared.NAME), **options))
            for declared in registry.declarations() for label, options in declared.DETERMINISM]


def backward_twice(fn, inputs: dict, seed: int = 0) -> list[dict]:
    """Two runs of ``fn(**inputs)`` and its backward on the ``triton`` backend, each after
    ``torch.manual_seed(seed)`` (dropout draws the same mask): ``{"out": ..., "d<input>": ...}`` each,
    for the inputs that require a gradient."""
    import fastgpt_kernels

    leaves = {name: t for name, t in inputs.items() if t.requires_grad}
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)
        with fastgpt_kernels.use_backend("triton"):
            out = fn(**inputs)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
            grads = torch.autograd.grad(out, list(leaves.values()), dout)
        runs.append({"out": out, **{f"d{name}": g for name, g in zip(leaves, grads)}})
    return runs


def bitwise_differences(first: dict, second: dict) -> dict[str, str]:
    """Per tensor that differs between two runs: how many elements and by how much at most."""
    found = {}
    for name, a in first.items():
        b = second[name]
        if not torch.equal(a, b):
            differ = (a != b) & ~(a.isnan() & b.isnan())
            found[name] = (f"{int(differ.sum())} of {a.numel()} elements differ, "
                           f"max |diff| {(a.double() - b.double()).abs().nan_to_num(float('inf')).max().item():.3e}")
    return found


def stage_determinism(run: StageRun) -> str | None:
    """Each case of :func:`determinism_cases` forward and backward twice: fails unless all is bitwise equal."""
    from bench import ops

    device = kernel_device()
    dtype = getattr(torch, low_precision(device))
    rows = []
    for label, case, fn in determinism_cases("tiny" if run.tiny else "gpt2", dtype):
        inputs = ops.make_inputs(case, device)
        first, second = backward_twice(fn, inputs)
        differences = bitwise_differences(first, second)
        rows.append({"op": label, "shape": case.shape_label, "dtype": str(dtype).removeprefix("torch."),
                     "tensors": list(first), "equal": not differences, "differences": differences})
        print(f"{label} {case.shape_label}: {'bitwise equal' if not differences else differences}", flush=True)
        run.record(rows=rows)
    unequal = [f"{r['op']} {', '.join(r['differences'])}" for r in rows if not r["equal"]]
    return f"not bitwise equal: {'; '.join(unequal)}" if unequal else None


# --------------------------------------------------------------------------- ops

OPS_ROUNDS = {"tiny": 1, "gpt2": 10}


def op_ratios(rows: list[dict]) -> list[dict]:
    """Per op and pass where both were measured: PyTorch's time over the Triton kernels' (> 1: Triton faster)."""
    measured = {(r["op"], r["pass"], r["provider"]): r for r in rows if r["status"] == "measured"}
    found = []
    for (op, pass_name, provider), ref in measured.items():
        triton_row = measured.get((op, pass_name, "triton"))
        if provider == "reference" and triton_row:
            found.append({"op": op, "shape": ref["shape"], "pass": pass_name, "reference_s": ref["time_s"],
                          "triton_s": triton_row["time_s"], "ratio": ref["time_s"] / triton_row["time_s"]})
    return found


OPS_ITERATIONS = {"tiny": 1, "gpt2": 20}  # calls back to back per timed round: the GPU's time, not Python's


def roofline_fractions(rows: list[dict], device_name: str | None) -> None:
    """Each measured row's ``roofline``: the time its FLOPs (or, LayerNorm, its bytes) take at the
    GPU's data-sheet peak (:data:`fastgpt.perf.GPUS`) over the time measured; None for a GPU the
    table lacks, or no GPU."""
    from fastgpt import perf

    spec = perf.gpu(device_name) if device_name else None
    for r in rows:
        if r.get("status") == "measured" and spec is not None:
            r["roofline"] = max((r.get("tflops") or 0) * 1e12 / spec.bf16_flops,
                                (r.get("gbps") or 0) * 1e9 / spec.bandwidth)
        else:
            r["roofline"] = None


def stage_ops(run: StageRun) -> str | None:
    """:func:`bench.ops.run` at GPT-2 shapes (tiny ones with ``--tiny``), PyTorch's time over Triton's,
    and each figure's fraction of the GPU's roofline. PyTorch's attention is SDPA with the backend
    the installed torch picks by default (the ``env`` stage lists the enabled ones)."""
    from bench import ops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "tiny" if run.tiny else "gpt2"
    dtype = getattr(torch, low_precision(device))
    rows = ops.run(size, device, dtype, OPS_ROUNDS[size], iterations=OPS_ITERATIONS[size])
    roofline_fractions(rows, torch.cuda.get_device_name() if device.type == "cuda" else None)
    ratios = op_ratios(rows)
    for r in ratios:
        print(f"{r['op']} {r['pass']}: reference / triton = {r['ratio']:.2f}")
    run.record(size=size, device=str(device), dtype=str(dtype).removeprefix("torch."), rounds=OPS_ROUNDS[size],
               iterations=OPS_ITERATIONS[size], rows=rows, ratios=ratios)
    missing = untimed_kernels(rows, device)
    return f"the Triton kernels were not timed: {'; '.join(missing)}" if missing else None


def untimed_kernels(rows: list[dict], device: torch.device) -> list[str]:
    """On a GPU, every Triton row of :func:`bench.ops.run` that says why it was not timed (a
    failure there); elsewhere none (the Triton provider is timed only on a GPU)."""
    if device.type != "cuda":
        return []
    return [f"{r['op']} {r['pass']}: {r['status']}" for r in rows
            if r["provider"] == "triton" and r["status"] != "measured"]


# --------------------------------------------------------------------------- train


def train_settings(tiny: bool) -> dict:
    """Model shape, context, batches and step counts of the ``train`` stage."""
    from bench import train_step

    if tiny:
        return dict(shape={**train_step.TINY_SHAPE, "n_layer": 1}, context=16, batches=(2, 1), warmup=0, steps=1)
    return dict(shape=train_step.GPT2_SHAPE, context=1024, batches=(16, 4), warmup=2, steps=5)


def autotuner_choices() -> dict[str, dict[str, str]]:
    """Per autotuned kernel, each launch key with the config it runs: chosen by Triton's autotuner in
    this process, or read from the disk cache (:func:`fastgpt_kernels.tuned_configs`)."""
    import fastgpt_kernels

    choices = {name: {} for name in fastgpt_kernels.candidate_configs()}
    for name, key, config in fastgpt_kernels.tuned_configs():
        choices[name][str(key)] = config
    return choices


# The train stage's variants: fastgpt's GPT on each kernels backend (auto: the faster of kernel and
# PyTorch per op, raced on its first step), and the same GPT-2 in plain PyTorch (bench.plain, eager):
# ``name -> (bench.train_step side, fastgpt's backend)``.
TRAIN_VARIANTS = {"torch": ("fastgpt", "torch"), "triton": ("fastgpt", "triton"), "auto": ("fastgpt", "auto"),
                  "plain": ("plain", None)}
TRAIN_RATIOS = (("triton", "torch"), ("triton", "plain"), ("auto", "torch"), ("auto", "plain"))
TRAIN_DROPOUTS = (0.0, 0.1)


def time_variant(name: str, side: str, backend: str | None, batch: int, dropout: float, settings: dict,
                 device: torch.device, compiled: bool = False) -> dict:
    """One training-step variant timed (:func:`bench.train_step.time_steps`), as a row of the report;
    ``compiled``: the model under ``torch.compile`` (its first step compiles it)."""
    from bench import train_step

    context, shape = settings["context"], settings["shape"]
    idx, targets = train_step.random_batch(shape, context, batch, device)
    model, optimizer = train_step.build(side, shape, context, dropout, device)
    step = train_step.step_fn(side, torch.compile(model) if compiled else model, optimizer, idx, targets,
                              low_precision(device), device, backend)
    timing = train_step.time_steps(step, batch * context, device, settings["steps"], settings["warmup"])
    print(f"B={batch} T={context} dropout={dropout} {name}: {timing['tokens_per_s']:.0f} tokens/s, "
          f"first step {timing['first_step_s']:.2f} s, peak {timing['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
    del model, optimizer, step
    gc.collect()
    return {"batch": batch, "context": context, "dropout": dropout, "backend": name, **timing}


def _ratio(rows: list[dict], batch: int, dropout: float, name: str, other: str) -> dict:
    fast, ref = (next(r for r in rows if (r["batch"], r["dropout"], r["backend"]) == (batch, dropout, n))
                 for n in (name, other))
    memory = fast["peak_memory_bytes"] / ref["peak_memory_bytes"] if ref["peak_memory_bytes"] else None
    return {"batch": batch, "dropout": dropout, "variant": name, "against": other,
            "speedup": fast["tokens_per_s"] / ref["tokens_per_s"], "memory_ratio": memory}


def stage_train(run: StageRun) -> str | None:
    """fastgpt's training step on each backend and plain PyTorch's, per batch and dropout, then the
    config every autotuned kernel ran."""
    device = kernel_device()
    settings = train_settings(run.tiny)
    rows = []
    for batch in settings["batches"]:
        for dropout in TRAIN_DROPOUTS:
            for name, (side, backend) in TRAIN_VARIANTS.items():
                rows.append(time_variant(name, side, backend, batch, dropout, settings, device))
                run.record(precision=low_precision(device), shape=settings["shape"], device=str(device), rows=rows)
    ratios = [_ratio(rows, batch, dropout, name, other) for batch in settings["batches"]
              for dropout in TRAIN_DROPOUTS for name, other in TRAIN_RATIOS]
    run.record(ratios=ratios, autotuned=autotuner_choices(), decisions=backend_decisions())
    return None


def backend_decisions() -> list[dict]:
    """What ``auto`` decided in this process (:func:`fastgpt_kernels.backend_decisions`): per op and
    shape class, the side that serves, why, and both timings."""
    import fastgpt_kernels
    from fastgpt_kernels._race import describe_shape_class

    return [{"op": d.op, "shape_class": describe_shape_class(d.shape_class), "served": d.served,
             "why": d.why, "kernel_ms": d.kernel_ms, "torch_ms": d.torch_ms, "speedup": d.speedup}
            for d in fastgpt_kernels.backend_decisions()]


def stage_compiled(run: StageRun) -> str | None:
    """The same GPT-2 in plain PyTorch under ``torch.compile`` (its first step compiles it), against
    fastgpt's GPT on the Triton kernels, eager: the largest batch, no dropout."""
    device = kernel_device()
    settings = train_settings(run.tiny)
    batch = settings["batches"][0]
    rows = [time_variant("plain compiled", "plain", None, batch, 0.0, settings, device, compiled=True)]
    run.record(precision=low_precision(device), shape=settings["shape"], device=str(device), rows=rows)
    rows.append(time_variant("triton", "fastgpt", "triton", batch, 0.0, settings, device))
    run.record(rows=rows, ratios=[_ratio(rows, batch, 0.0, "triton", "plain compiled")])
    return None


# --------------------------------------------------------------------------- sanitizer


def sanitizer_calls(dtype: torch.dtype) -> list[tuple[str, dict, tuple, Callable]]:
    """``(label, pins, covers, call)``: one small forward and backward of every launch config of every
    kernel, from each op's declaration (``sanitizer_calls``).

    Each call runs under ``fastgpt_kernels.use_configs(pins)`` (the autotuned kernels of its op pinned,
    so nothing is autotuned under the sanitizer); ``covers`` names the fixed configs it runs.
    """
    import fastgpt_kernels
    from fastgpt_kernels import _tuning, registry

    def backward(declared, dims, options):
        def call(device):
            inputs = declared.bench_inputs(dims, dtype, device)
            out = getattr(fastgpt_kernels, declared.NAME)(**inputs, **options)
            torch.autograd.grad(out, [t for t in inputs.values() if t.requires_grad], torch.ones_like(out))
        return call

    calls = []
    for declared in registry.declarations():
        for planned in declared.sanitizer_calls(dtype):
            call = backward(declared, planned.dims, planned.options)
            rounds = max([len(configs) for configs in planned.allowed.values()], default=1)
            for i in range(rounds):
                pins = {name: configs[i % len(configs)] for name, configs in planned.allowed.items()}
                described = ", ".join(f"{name} {_tuning.describe(config)}" for name, config in pins.items())
                calls.append((f"{planned.label}: {described}" if pins else planned.label, pins, planned.covers, call))
    return calls


def stage_sanitizer_target(run: StageRun) -> str | None:
    """Every call of :func:`sanitizer_calls`; fails on a call that raises or a kernel config never run."""
    import fastgpt_kernels
    from bench import measure
    from fastgpt_kernels import _tuning, registry

    device = kernel_device()
    dtype = getattr(torch, low_precision(device))
    done, failed, covered = [], [], set()
    for label, pins, covers, call in sanitizer_calls(dtype):
        try:
            with fastgpt_kernels.use_configs(pins), fastgpt_kernels.use_backend("triton"):
                call(device)
            measure.synchronize(device)  # an asynchronous fault shows up here, on its own call
        except Exception as exc:
            failed.append(f"{label}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            print(f"{label}: FAILED", flush=True)
        else:
            done.append(label)
            covered |= {(name, _tuning.describe(config)) for name, config in pins.items()} | set(covers)
            print(f"{label}: ok", flush=True)
        run.record(device=str(device), dtype=str(dtype).removeprefix("torch."), calls=len(done) + len(failed),
                   failed=failed)
    uncovered = sorted(f"{name} {_tuning.describe(config)}" for name, configs in _tuning.candidate_configs().items()
                       for config in configs if (name, _tuning.describe(config)) not in covered)
    uncovered += [label for declared in registry.declarations() for label in declared.fixed_configs()
                  if label not in covered]
    run.record(uncovered=uncovered)
    if uncovered:
        failed.append(f"never ran: {', '.join(uncovered)}")
    return "; ".join(failed) or None


def sanitizer_summary(text: str) -> dict:
    """compute-sanitizer's verdict from its output: errors, warnings, and whether a summary line was printed."""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY:\s*(\d+) errors?", text)]
    races = re.findall(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    findings = [line for line in text.splitlines()
                if line.startswith("========= ") and re.search(r"\b(Invalid|Error|Race|Hazard|Warning)", line)
                and "SUMMARY" not in line]
    return {"summary": bool(errors or races), "errors": sum(errors) + sum(int(r[1]) for r in races),
            "warnings": sum(int(r[2]) for r in races), "findings": findings[:20]}


def stage_sanitizer(run: StageRun) -> str | None:
    """The ``sanitizer-target`` stage under each of :data:`SANITIZER_TOOLS`; skipped without the tool or a GPU."""
    exe = find_sanitizer()
    if exe is None:
        raise Skipped("compute-sanitizer is not installed (not on PATH, nor in CUDA_HOME/bin or /usr/local/cuda/bin)")
    if not torch.cuda.is_available():
        raise Skipped("no CUDA device: the sanitizers check kernels running on a GPU")
    tools, problems = {}, []
    for i, tool in enumerate(SANITIZER_TOOLS):
        result = run.workdir / f"sanitizer-{tool}.result.jsonl"
        result.unlink(missing_ok=True)
        command = [exe, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT),
                   # PyTorch's own start-up hits CUDA API errors on purpose; the kernels' accesses are the question.
                   "--report-api-errors", "no",
                   sys.executable, "-m", "bench.gpu_report", "--stage", "sanitizer-target", "--result", str(result)]
        if run.tiny:
            command.append("--tiny")
        # Each tensor its own allocation: inside the caching allocator's blocks memcheck sees no bounds.
        env = {**child_env(cuda=True), "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        # The first run compiles the target's kernels; the next one finds them in Triton's cache.
        share = 1.0 if i == len(SANITIZER_TOOLS) - 1 else 0.6
        timeout = max(1.0, run.seconds_left() * share - 3)  # ended (with its target) before the parent ends us
        code, output, seconds = run_group(command, env, timeout, run.workdir / f"sanitizer-{tool}.log")
        verdict = sanitizer_summary(output)
        target = last_record(result)
        tools[tool] = {"exit": code, "seconds": seconds, **verdict, "target_failed": target.get("failed"),
                       "target_calls": target.get("calls"), "uncovered": target.get("uncovered"),
                       "output_tail": output[-TAIL_CHARS:]}
        if code is None:
            problems.append(f"{tool}: did not finish in {timeout:.0f} s")
        elif verdict["errors"]:
            problems.append(f"{tool}: {verdict['errors']} errors")
        elif code or not verdict["summary"] or target.get("failed") or target.get("uncovered") is None:
            problems.append(f"{tool}: the target did not run cleanly (exit {code})")
        print(f"{tool}: exit {code}, {verdict['errors']} errors, {verdict['warnings']} warnings", flush=True)
        run.record(sanitizer=exe, tools=tools)
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- the stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage: its code (run in the child), its budgets (seconds) and what it is."""

    name: str
    run: Callable[[StageRun], str | None]
    budget_s: float
    tiny_budget_s: float
    title: str

    def budget(self, tiny: bool, scale: float = 1.0) -> float:
        """Seconds the stage may run: its budget for the run's size, times ``scale``."""
        return (self.tiny_budget_s if tiny else self.budget_s) * scale


# The budgets add up to 570 s: the whole report fits in ten minutes on one GPU.
STAGES = {s.name: s for s in (
    Stage("env", stage_env, 15, 60, "versions and the GPU"),
    Stage("warmup", stage_warmup, 90, 60, "every kernel the later stages launch, compiled side by side"),
    Stage("verify", stage_verify, 70, 120, "every kernel output and gradient against float64"),
    Stage("tests", stage_tests, 80, 180, "the kernel test files under pytest"),
    Stage("determinism", stage_determinism, 30, 120, "every backward twice, bitwise"),
    Stage("ops", stage_ops, 45, 120, "per op against PyTorch's own"),
    Stage("train", stage_train, 70, 180, "a GPT-2 124M training step"),
    Stage("compiled", stage_compiled, 100, 120, "plain PyTorch under torch.compile against fastgpt"),
    Stage("sanitizer", stage_sanitizer, 70, 240, "compute-sanitizer memcheck and racecheck"),
)}
# Run by the sanitizer stage under compute-sanitizer, never as a stage of the report itself.
TARGETS = {"sanitizer-target": Stage("sanitizer-target", stage_sanitizer_target, 60, 120,
                                     "every kernel config once, forward and backward"),
           "warmup-worker": Stage("warmup-worker", stage_warmup_worker, 90, 60, "a share of the warm-up's compiles")}


def run_stage(name: str, tiny: bool, deadline: float, result: Path | None, parent: int | None = None,
              part: tuple[int, int] = (0, 1)) -> int:
    """The child: run stage ``name``, recording its figures and status; exit status 0 unless it failed.

    It ends itself, and everything it started, at ``deadline`` (its figures so far recorded with
    status "timeout") or as soon as ``parent`` (default: its parent now) is gone; SIGTERM and SIGHUP
    stop it as Ctrl-C does, its processes with it.
    """
    run = StageRun(tiny, deadline, result, part=part)
    from fastgpt_kernels import _dispatch

    if not _dispatch.NO_TRITON_REASON:
        count_compiles(run.figures)

    def on_exit(reason: str) -> None:
        if reason == "deadline":
            run.record(status="timeout", reason="past its deadline: ended itself and what it had started")

    _processes.watch(parent, deadline, on_exit)
    try:
        with _processes.stop_on_signals():
            problem = {**STAGES, **TARGETS}[name].run(run)
    except KeyboardInterrupt:  # stopped: what the stage started goes with it
        _processes.kill_tree(os.getpid())
        raise
    except Skipped as exc:
        print(f"skipped: {exc}")
        run.record(status="skipped", reason=str(exc))
        return 0
    except Exception as exc:
        traceback.print_exc()
        run.record(status="failed", reason=f"{type(exc).__name__}: {exc}")
        return 1
    run.record(status="failed" if problem else "ok", reason=problem)
    return 1 if problem else 0
