"""``python -m bench.gpu_report``: the tiny report runs every stage here; a stage that crashes or hangs
is reported and the next one runs; the CUDA-only branches (the GPU's facts, the sanitizer stage, the
stages' environment) run against stand-ins for the GPU and its tools."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.gpu_report import children, runner
from bench.gpu_report import report as report_md
from bench.gpu_report import stages as report_stages
from conftest import assert_processes_end
from fastgpt_kernels import _dispatch, _processes, _tuning

pytestmark = pytest.mark.slow  # end-to-end: see the "slow" marker in pyproject.toml

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(not _dispatch.INTERPRETED and not torch.cuda.is_available(),
                                   reason="needs the kernels to run")


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "OPENBLAS_NUM_THREADS": "1", **overrides}


@needs_kernels
def test_the_tiny_report_runs_every_stage_on_cold_caches_and_writes_json_and_markdown(tmp_path):
    """The rehearsal of a first run on a fresh machine: Triton's and the autotuner's caches empty."""
    cold = dict(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), FASTGPT_AUTOTUNE_CACHE=str(tmp_path / "autotune"))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(**cold), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for i, name in enumerate(report_stages.STAGES, 1):  # progress as each stage starts and ends
        assert f"[{i}/{len(report_stages.STAGES)}] {name}: " in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tiny"] and list(report["stages"]) == list(report_stages.STAGES)
    stages = report["stages"]
    for name, entry in stages.items():
        assert entry["status"] in ("ok", "skipped"), (name, entry["reason"], entry["output_tail"])
        assert entry["seconds"] > 0 and entry["budget_s"] == report_stages.STAGES[name].tiny_budget_s
        assert (tmp_path / "logs" / f"{name}.log").exists()
        compiles = entry["figures"]["compiles"]  # the interpreter compiles nothing: counted all the same
        assert set(compiles) == {"compiled", "from_disk", "seconds"}, name
    assert stages["warmup"]["status"] == "skipped" and "interpreter" in stages["warmup"]["reason"]

    assert stages["env"]["figures"]["torch"] == torch.__version__
    verify = stages["verify"]["figures"]
    assert verify["passed"] > 0 and verify["failed"] == verify["errors"] == 0
    tests = stages["tests"]["figures"]
    assert tests["passed"] >= 3 and tests["failed"] == 0 and tests["exit_code"] == 0
    determinism = stages["determinism"]["figures"]["rows"]
    assert [r["op"] for r in determinism] == ["layer_norm", "attention", "attention dropout 0.1", "gelu_mlp",
                                                  "linear_cross_entropy"]
    assert all(r["equal"] for r in determinism)
    ops_rows = stages["ops"]["figures"]["rows"]
    assert {r["provider"] for r in ops_rows} == {"naive", "unfused", "reference", "triton"}
    train = stages["train"]["figures"]
    assert len(train["rows"]) == 2 * len(report_stages.TRAIN_DROPOUTS) * len(report_stages.TRAIN_VARIANTS)
    assert {(r["variant"], r["against"]) for r in train["ratios"]} == set(report_stages.TRAIN_RATIOS)
    assert train["decisions"] == []  # CPU tensors: auto never races there
    compiled = stages["compiled"]["figures"]
    assert [r["backend"] for r in compiled["rows"]] == ["plain compiled", "triton"]
    assert compiled["ratios"][0]["against"] == "plain compiled" and compiled["ratios"][0]["speedup"] > 0
    assert all(r["tokens_per_s"] > 0 and r["first_step_s"] > 0 for r in train["rows"])
    assert set(train["autotuned"]) == set(_tuning.candidate_configs())
    if report_stages.find_sanitizer() is None or not torch.cuda.is_available():
        assert stages["sanitizer"]["status"] == "skipped"
        assert "compute-sanitizer" in stages["sanitizer"]["reason"] or "no CUDA device" in stages["sanitizer"]["reason"]

    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# fastgpt GPU report: ") and report["date"] in md and f"torch {torch.__version__}" in md
    assert "its figures mean nothing" in md
    for name in report_stages.STAGES:
        assert f"\n## {name}: " in md
    assert "| layer_norm | M=64 N=32 | forward |" in md and "| 2 | 0.1 | triton |" in md


def test_a_crashing_and_a_hanging_stage_are_reported_and_the_next_stage_still_runs(tmp_path, monkeypatch, capsys):
    pid_file = tmp_path / "grandchild.pid"
    crash = textwrap.dedent("""
        import json, os, signal, sys
        result = sys.argv[sys.argv.index("--result") + 1]
        with open(result, "a") as f:
            f.write(json.dumps({"passed": 3}) + "\\n")
        print("about to crash", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    """)
    hang = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("hanging", flush=True)
        time.sleep(300)
    """)
    real_command = children.stage_command
    fakes = {"verify": crash, "tests": hang}

    def command(name, tiny, deadline, result):
        if name in fakes:
            return [sys.executable, "-c", fakes[name], "--result", str(result)]
        return real_command(name, tiny, deadline, result)

    monkeypatch.setattr(children, "stage_command", command)
    monkeypatch.setitem(report_stages.STAGES, "tests", dataclasses.replace(report_stages.STAGES["tests"], tiny_budget_s=3))
    start = time.monotonic()
    code = runner.main(["--tiny", "--out", str(tmp_path), "--only", "verify", "--only", "tests",
                            "--only", "env"])
    assert code == 1
    assert time.monotonic() - start < 60
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["stages"]) == ["env", "verify", "tests"]  # in the report's order, not the options'
    crashed, hung, env = report["stages"]["verify"], report["stages"]["tests"], report["stages"]["env"]
    assert crashed["status"] == "failed" and crashed["reason"] == "killed by SIGSEGV"
    assert crashed["figures"] == {"passed": 3} and "about to crash" in crashed["output_tail"]
    assert hung["status"] == "timeout" and "budget of 3 s" in hung["reason"] and hung["seconds"] < 20
    assert "hanging" in hung["output_tail"]
    assert env["status"] == "ok"
    grandchild = int(pid_file.read_text())  # killed with its stage: its whole process group
    assert_processes_end([grandchild], 5, "the hanging stage's child")
    md = (tmp_path / "report.md").read_text()
    assert "| verify | failed |" in md and "| tests | timeout |" in md and "about to crash" in md
    out = capsys.readouterr().out
    assert "verify: failed in" in out and "tests: timeout in" in out


def test_the_default_budgets_fit_the_report_in_ten_minutes():
    assert sum(stage.budget_s for stage in report_stages.STAGES.values()) <= 10 * 60 - 10  # the parent's start-up
    assert list(report_stages.STAGES) == ["env", "warmup", "verify", "tests", "determinism", "ops", "train",
                                       "compiled", "sanitizer"]


def test_bad_options_are_refused(capsys):
    for argv, message in ((["--budget-scale", "0"], "--budget-scale must be positive, got 0.0"),
                          (["--only", "nothing"], "invalid choice: 'nothing'")):
        with pytest.raises(SystemExit):
            runner.parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_test_files_exist_and_the_tiny_selection_picks_tests_of_every_op():
    for path in report_stages.TEST_FILES:
        assert (ROOT / path).is_file(), path
    for op in ("layer_norm", "attention", "gelu_mlp", "linear_cross_entropy"):
        assert f"tests/test_{op}.py" in report_stages.TEST_FILES
        assert f"def test_backward_is_{report_stages.TINY_TESTS}" in (ROOT / f"tests/test_{op}.py").read_text()


@needs_kernels
def test_the_sanitizer_target_runs_every_config_of_every_kernel(tmp_path):
    result = tmp_path / "target.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--stage", "sanitizer-target", "--tiny",
                           "--result", str(result)], cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = children.last_record(result)
    assert figures["status"] == "ok" and figures["failed"] == [] and figures["uncovered"] == []
    # one call runs one config of each of its op's kernels, so an op takes as many calls as its longest list
    most = max(len(configs) for configs in _tuning.candidate_configs().values())
    assert figures["calls"] == proc.stdout.count(": ok") >= most


# --------------------------------------------------------------------------- CUDA-only branches


def test_stages_run_the_interpreter_only_without_a_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert "TRITON_INTERPRET" not in children.child_env(cuda=True)  # a GPU runs the kernels compiled
    cpu = children.child_env(cuda=False)
    assert cpu["TRITON_INTERPRET"] == "1" and cpu["OPENBLAS_NUM_THREADS"] == "4"  # the user's setting wins
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert children.child_env(cuda=False)["OPENBLAS_NUM_THREADS"] == "1"


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_the_kernels_run_in_the_gpus_training_precision(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert report_stages.low_precision(torch.device("cuda")) == expected
    assert report_stages.low_precision(torch.device("cpu")) == "bfloat16"  # through the interpreter's bf16 shim


def test_kernel_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert report_stages.kernel_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="no CUDA device and Triton's interpreter is off"):
        report_stages.kernel_device()


def test_gpu_facts_come_from_the_device_properties_and_nvidia_smi(tmp_path, monkeypatch):
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000,
                            multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert report_stages.gpu_info(torch.device("cuda")) == {"name": "NVIDIA H200", "capability": "9.0",
                                                         "memory_gib": 139.7, "sms": 132, "bf16": True}
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0 |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = report_stages.nvidia_smi()
    assert found["driver"] == "580.65.06" and found["cuda"] == "13.0" and "NVIDIA-SMI" in found["output"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert report_stages.nvidia_smi() is None


def test_untimed_triton_rows_fail_the_ops_stage_only_on_a_gpu():
    rows = [{"op": "attention", "shape": "B=1", "pass": "forward", "provider": "triton", "status": "needs a CUDA GPU"},
            {"op": "attention", "shape": "B=1", "pass": "forward", "provider": "reference", "status": "measured",
             "time_s": 2.0}]
    assert report_stages.untimed_kernels(rows, torch.device("cpu")) == []
    assert report_stages.untimed_kernels(rows, torch.device("cuda")) == ["attention forward: needs a CUDA GPU"]
    rows[0].update(status="measured", time_s=0.5)
    assert report_stages.untimed_kernels(rows, torch.device("cuda")) == []
    assert report_stages.op_ratios(rows) == [{"op": "attention", "shape": "B=1", "pass": "forward", "reference_s": 2.0,
                                           "triton_s": 0.5, "ratio": 4.0}]


def test_the_autotuners_choices_are_listed_per_kernel_and_key_those_from_disk_included(monkeypatch):
    """A choice read from the disk cache is one Triton's autotuner never made in this process (its own
    cache is empty): the table lists what runs."""
    config = _tuning.candidate_configs()["gelu_mlp.fwd"][0]
    key = (16384, 3072, 768, "torch.bfloat16")
    from_disk = _tuning.Tunable("gelu_mlp.fwd", SimpleNamespace(cache={}), (config,), chosen={key: config}, loaded=True)
    monkeypatch.setattr(_tuning, "_REGISTRY", {"gelu_mlp.fwd": from_disk,
                                               "attention.fwd": _tuning.Tunable("attention.fwd",
                                                                                SimpleNamespace(cache={}), ())})
    assert report_stages.autotuner_choices() == {"gelu_mlp.fwd": {str(key): _tuning.describe(config)}, "attention.fwd": {}}


def test_every_stage_counts_the_kernels_triton_compiles_and_loads(monkeypatch):
    """Triton's own hooks, called as its JIT and compiler call them (no GPU compiles anything here)."""
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(triton.knobs.compilation, "listener", None)
    figures = {}
    report_stages.count_compiles(figures)
    for cache_hit in (False, False, True):
        assert triton.knobs.runtime.jit_cache_hook(key=None, repr="k", fn=None, compile={}, is_manual_warmup=False,
                                                   already_compiled=False) is False  # True would skip the compile
        triton.knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=None, cache_hit=cache_hit)
    assert figures["compiles"]["compiled"] == 2 and figures["compiles"]["from_disk"] == 1
    assert figures["compiles"]["seconds"] >= 0


@needs_kernels
@pytest.mark.parametrize("parts", [1, 3])
def test_warmup_workers_share_every_config_the_later_stages_launch(monkeypatch, parts):
    """The warm-up's calls in compile-only mode, on the path a GPU takes (its autotuner awaiting every
    key), with Triton's compile-without-launch replaced by a recorder: between them the workers
    compile each config the op allows for every launch the stages make, each exactly once, and
    launch nothing."""
    from fastgpt_kernels import _dispatch

    monkeypatch.setattr(_tuning, "_autotuner_can_time", lambda: True)
    monkeypatch.setattr(_tuning, "SMALL_TOKENS", 0)  # the tiny shapes' launches await tuning, as GPT-2's do
    for tunable in _tuning.tunables().values():
        monkeypatch.setattr(tunable, "chosen", {})
    compiled = []
    jitted = {id(fn): fn for op in _dispatch.OPS for fn in vars(_dispatch.kernel_module(op)).values()
              if hasattr(fn, "fn") or type(fn).__name__ in ("JITFunction", "InterpretedFunction")}
    for tunable in _tuning.tunables().values():
        jitted[id(tunable.fn)] = tunable.fn
    for fn in jitted.values():
        if hasattr(fn, "warmup") or type(fn).__name__ == "InterpretedFunction":
            monkeypatch.setattr(fn, "warmup", lambda *args, grid, fn=fn, **meta: compiled.append(
                (getattr(fn, "__name__", None) or fn.fn.__name__, tuple(sorted(meta.items())))), raising=False)
    device = report_stages.kernel_device()
    calls = report_stages.warmup_calls(True, device)
    assert any(label.startswith("train") for label, _ in calls) and any(" " in label for label, _ in calls)
    per_worker = []
    for index in range(parts):
        before = len(compiled)
        with report_stages.compile_only((index, parts)):
            for _, call in calls:
                call()
        per_worker.append(compiled[before:])
    everything = [c for worker in per_worker for c in worker]
    with report_stages.compile_only((0, 1)):
        for _, call in calls:
            call()
    alone = compiled[len(everything):]
    assert sorted(everything) == sorted(alone)  # shared out, nothing lost, nothing twice
    kernels = {name for name, _ in alone}
    assert {"_attention_fwd_kernel", "_gelu_mlp_fwd_kernel", "_layer_norm_fwd_kernel", "_lce_logits_kernel"} <= kernels
    assert all(per_worker)  # every worker has a share
    assert len(alone) > len(_tuning.candidate_configs())  # several configs per autotuned kernel, not one


def test_sanitizer_summaries_are_read_from_its_output():
    clean = report_stages.sanitizer_summary("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert clean == {"summary": True, "errors": 0, "warnings": 0, "findings": []}
    memcheck = report_stages.sanitizer_summary(
        "========= Invalid __global__ read of size 2 bytes\n=========     at _layer_norm_fwd_kernel+0x1f0\n"
        "========= ERROR SUMMARY: 1 error\n")
    assert memcheck["errors"] == 1 and memcheck["findings"] == ["========= Invalid __global__ read of size 2 bytes"]
    races = report_stages.sanitizer_summary("========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n")
    assert (races["errors"], races["warnings"]) == (1, 2)
    assert not report_stages.sanitizer_summary("Segmentation fault\n")["summary"]  # the tool never finished


@needs_kernels
def test_the_sanitizer_stage_runs_both_tools_over_the_target_and_reports_their_errors(tmp_path, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    # Runs the target itself under memcheck (in Triton's interpreter: no GPU here) and finds nothing;
    # under racecheck finds a race without running anything.
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, subprocess, sys
        args = sys.argv[1:]
        tool = args[args.index("--tool") + 1]
        with open({str(calls)!r}, "a") as f:
            f.write(json.dumps({{"args": args, "caching": os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING")}}) + "\\n")
        if tool == "memcheck":
            code = subprocess.call(args[args.index({sys.executable!r}):], env={{**os.environ, "TRITON_INTERPRET": "1"}})
            print("========= ERROR SUMMARY: 0 errors")
            sys.exit(code)
        print("========= Error: Race reported between Write access at _attention_bwd_dq_kernel+0x2c0")
        print("========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)")
        sys.exit({report_stages.SANITIZER_ERROR_EXIT})
    """))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = report_stages.StageRun(tiny=True, deadline=time.time() + 600, result=tmp_path / "sanitizer.result.jsonl")
    assert report_stages.stage_sanitizer(run) == "racecheck: 1 errors"
    invoked = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c["args"][:4] for c in invoked] == [["--tool", tool, "--error-exitcode", "86"]
                                               for tool in report_stages.SANITIZER_TOOLS]
    assert all(c["caching"] == "1" for c in invoked)
    assert all("sanitizer-target" in c["args"] and "--tiny" in c["args"] for c in invoked)
    memcheck, racecheck = run.figures["tools"]["memcheck"], run.figures["tools"]["racecheck"]
    assert memcheck["exit"] == 0 and memcheck["errors"] == 0 and memcheck["summary"]
    assert memcheck["target_failed"] == [] and memcheck["uncovered"] == [] and memcheck["target_calls"] > 0
    assert racecheck["exit"] == report_stages.SANITIZER_ERROR_EXIT and racecheck["errors"] == 1
    assert racecheck["findings"] == ["========= Error: Race reported between Write access at "
                                     "_attention_bwd_dq_kernel+0x2c0"]
    md = report_md._section_sanitizer(run.figures)
    assert "| racecheck | 86 | 1 | 0 | - | - |" in md


def test_compute_sanitizer_is_found_on_path_or_in_the_cuda_toolkit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    if Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        pytest.skip("this machine has a CUDA toolkit in /usr/local/cuda")
    assert report_stages.find_sanitizer() is None
    tool = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert report_stages.find_sanitizer() == str(tool)
    monkeypatch.setenv("PATH", str(tool.parent))
    assert report_stages.find_sanitizer() == str(tool)


def test_the_sanitizer_stage_is_skipped_with_the_reason_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(report_stages, "find_sanitizer", lambda: None)
    run = report_stages.StageRun(tiny=True, deadline=time.time() + 10, result=None)
    with pytest.raises(report_stages.Skipped, match="compute-sanitizer is not installed"):
        report_stages.stage_sanitizer(run)
    monkeypatch.setattr(report_stages, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(report_stages.Skipped, match="no CUDA device"):
        report_stages.stage_sanitizer(run)


# --------------------------------------------------------------------------- stopping: no process left behind


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"waited {seconds:.0f} s for {what}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pytest_under(pid: int) -> list[int]:
    """The tree under ``pid`` once it holds a pytest process (the tests stage's), else []."""
    tree = _processes.descendants(pid)
    return tree if any(" pytest " in _cmdline(p) for p in tree) else []


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_a_report_stopped_mid_stage_leaves_no_process_behind(tmp_path, sig):
    report = subprocess.Popen([sys.executable, "-m", "bench.gpu_report", "--tiny", "--only", "tests",
                               "--out", str(tmp_path)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        tree = _wait_for(lambda: _pytest_under(report.pid), 120, "the tests stage to start pytest")
        os.kill(report.pid, sig)
        _, stderr = report.communicate(timeout=30)
    finally:
        report.kill()
    assert_processes_end(tree, 3, "the stage's processes")
    if sig != signal.SIGKILL:  # the report itself said so and wrote it down (SIGKILL leaves it no say)
        assert report.returncode == 128 + sig
        assert f"stopped (stopped by {sig.name}) during the tests stage" in stderr
        assert "stopped" in json.loads((tmp_path / "report.json").read_text())["error"]


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_stage_past_its_deadline_ends_itself_and_what_it_started(tmp_path):
    """Nobody signals the stage: its own deadline ends it, with the figures so far marked "timeout"."""
    result = tmp_path / "tests.result.jsonl"
    stage = subprocess.Popen([sys.executable, "-m", "bench.gpu_report", "--stage", "tests", "--tiny",
                              "--deadline", f"{time.time() + 6:.3f}", "--result", str(result)],
                             cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        while stage.poll() is None:  # every process the stage starts (pytest, its workers), as they come
            seen.update(_processes.descendants(stage.pid))
            time.sleep(0.1)
        assert stage.returncode == _processes.DEADLINE_EXIT
    finally:
        stage.kill()
    assert seen, "the stage had started nothing by its deadline"
    assert_processes_end(sorted(seen), 3, "the stage's processes")
    last = children.last_record(result)
    assert last["status"] == "timeout" and "past its deadline" in last["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_report_says_so_at_once_and_how_to_rehearse(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert proc.stderr.strip() == runner.NO_GPU and "--tiny" in runner.NO_GPU
    assert runner.NO_GPU in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["stages"] == {}


def test_the_preflight_names_what_triton_needs_and_is_missing_in_one_line(monkeypatch, tmp_path):
    import ctypes.util
    import sysconfig

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("TRITON_LIBCUDA_PATH", raising=False)
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    missing = runner.preflight()
    assert len(missing) == 3 and "\n" not in "; ".join(missing)
    assert "C compiler" in missing[0] and "Python.h" in missing[1] and "libcuda" in missing[2]
    (tmp_path / "Python.h").write_text("")
    monkeypatch.setattr(runner.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libcuda.so.1")
    assert runner.preflight() == []


def test_roofline_fractions_rate_each_measured_row_against_the_gpus_data_sheet():
    from fastgpt import perf

    h100 = perf.gpu_named("H100 SXM")
    rows = [{"status": "measured", "tflops": h100.bf16_flops / 2e12, "gbps": None},  # half the FLOP peak
            {"status": "measured", "tflops": None, "gbps": h100.bandwidth / 4e9},  # a quarter of the bandwidth
            {"status": "needs a CUDA GPU"}]
    report_stages.roofline_fractions(rows, "NVIDIA H100 80GB HBM3")
    assert [r["roofline"] for r in rows] == [pytest.approx(0.5), pytest.approx(0.25), None]
    report_stages.roofline_fractions(rows, None)  # no GPU: nothing to rate against
    assert all(r["roofline"] is None for r in rows)


def test_the_warmup_stage_runs_its_workers_side_by_side_and_adds_up_their_compiles(tmp_path, monkeypatch):
    """The warm-up's parent on the path a GPU takes, with stand-in workers that write what a worker
    records: each gets its share, the counts are summed, a failing worker is reported."""
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    monkeypatch.setattr(report_stages, "WARMUP_WORKERS", 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    worker = textwrap.dedent("""
        import json, sys
        args = sys.argv[1:]
        index = int(args[args.index("--part") + 1].split("/")[0])
        figures = {"asked": 10 + index, "failed": ["attention: CompilationError"] if index == 2 else [],
                   "compiles": {"compiled": 4, "from_disk": index, "seconds": 1.5}}
        open(args[args.index("--result") + 1], "a").write(json.dumps(figures) + "\\n")
        sys.exit(1 if index == 2 else 0)
    """)
    monkeypatch.setattr(children, "stage_command", lambda name, tiny, deadline, result: [
        sys.executable, "-c", worker, "--result", str(result)])
    run = report_stages.StageRun(tiny=True, deadline=time.time() + 60, result=tmp_path / "warmup.result.jsonl")
    problem = report_stages.stage_warmup(run)
    totals = children.last_record(run.result)["warmup"]
    assert totals["workers"] == 3 and totals["asked"] == 33
    assert totals["compiled"] == 12 and totals["from_disk"] == 3 and totals["seconds"] == 4.5
    assert totals["failed"] == ["attention: CompilationError"] and problem == "1 warm-up call(s) failed to compile"


def test_on_a_gpu_a_missing_compiler_stops_the_report_in_one_line(tmp_path, monkeypatch, capsys):
    """The branch only a CUDA machine takes, with stand-ins: torch sees a GPU, the preflight finds
    what Triton lacks, and the report stops before any stage."""
    from bench import measure

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(measure, "machine_info", lambda device: {"gpu": "stand-in GPU", "cpu": "cpu",
                                                                 "python": "3", "torch": "t", "triton": "3"})
    monkeypatch.setattr(runner, "preflight", lambda: ["a C compiler (cc, gcc or clang on PATH, or $CC)"])
    assert runner.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("Triton cannot compile kernels on this machine; missing: "
                   "a C compiler (cc, gcc or clang on PATH, or $CC)")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["error"] == err and report["stages"] == {}


def test_the_train_section_lists_autos_decisions_with_both_timings():
    figures = {"precision": "bfloat16", "shape": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304),
               "rows": [{"batch": 16, "context": 1024, "dropout": 0.0, "backend": "auto", "tokens_per_s": 1e5,
                         "time_s": 0.16, "first_step_s": 3.0, "peak_memory_bytes": 2**30}],
               "decisions": [{"op": "layer_norm", "shape_class": "(bfloat16 16384x768, 1e-05, backward)",
                              "served": "torch", "why": "raced", "kernel_ms": 0.2, "torch_ms": 0.1, "speedup": 0.5},
                             {"op": "attention", "shape_class": "(bfloat16 196608x64, True, 0.0, backward)",
                              "served": "kernel", "why": "deterministic algorithms: ...", "kernel_ms": None,
                              "torch_ms": None, "speedup": None}]}
    md = "\n".join(report_md._section_train(figures))
    assert "| layer_norm | (bfloat16 16384x768, 1e-05, backward) | PyTorch | raced | 0.200 | 0.100 | 0.50x |" in md
    assert "| attention | (bfloat16 196608x64, True, 0.0, backward) | kernel | deterministic algorithms: ... | - | - | - |" in md
