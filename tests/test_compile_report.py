"""fastgpt_kernels.tools.compile_report: offline sm_80/sm_90a compiles of the kernels in tests/_compile_report_example.py.

Compiling needs Triton's interpreter off, and this test session runs with it on, so the compiles
happen in a subprocess. compile_report is loaded there by file path, so these tests do not depend
on the rest of the kernels package.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: see the "slow" marker in pyproject.toml
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
MODULE_PATH = ROOT / "fastgpt_kernels" / "tools" / "compile_report.py"

# Loads compile_report by path (as fastgpt_kernels.tools.compile_report, which the example module imports), dumps
# run()'s results as JSON to argv[1], then exits with main()'s status on the same specs.
HARNESS = f"""
import dataclasses, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("fastgpt_kernels.tools.compile_report", {str(MODULE_PATH)!r})
cr = importlib.util.module_from_spec(spec)
sys.modules["fastgpt_kernels.tools.compile_report"] = cr
spec.loader.exec_module(cr)
import _compile_report_example as example
results = cr.run(example.compile_specs(), archs=(80, 90), jobs=2, progress=None)
with open(sys.argv[1], "w") as f:
    json.dump([dict(dataclasses.asdict(r), problems=r.problems) for r in results], f)
sys.exit(cr.main(sys.argv[2:]))
"""


def _env(tmp: Path, interpret: str = "0") -> dict:
    python_path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "TRITON_INTERPRET": interpret, "TRITON_CACHE_DIR": str(tmp / "triton_cache"),
            "PYTHONPATH": python_path}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``(results by (kernel config, arch), CompletedProcess of main)`` for the example specs."""
    tmp = tmp_path_factory.mktemp("compile_report")
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(out), "--module", "_compile_report_example",
                           "--jobs", "2"], cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert out.exists(), f"harness failed:\n{proc.stdout}\n{proc.stderr}"
    results = {(r["config"], r["arch"]): r for r in json.loads(out.read_text())}
    return results, proc


def _rows(results, config_prefix):
    rows = [r for (config, _), r in results.items() if config.startswith(config_prefix)]
    assert rows, f"no results for {config_prefix!r}: {sorted(results)}"
    return rows


def test_every_spec_compiled_for_both_archs(report):
    results, _ = report
    assert len(results) == 10
    assert {arch for _, arch in results} == {80, 90}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_elementwise_kernel_is_clean_and_vectorised(report, dtype):
    results, _ = report
    for arch in (80, 90):
        r = results[(f"BLOCK=1024 warps=4 {dtype}", arch)]
        assert r["error"] is None and r["problems"] == [], r
        assert r["kernel"] == "scale_add_kernel"
        assert r["spill_bytes"] == 0 and r["local_ops"] == 0
        assert 0 < r["registers"] <= 255
        assert r["shared"] <= r["shared_limit"]
        assert r["tensor_core_ops"] == 0
        # Contiguous, 16-byte-aligned inputs: 128-bit global loads and stores.
        assert r["vector_loads"] > 0 and r["vector_stores"] > 0, r


def test_dot_kernel_uses_hmma_on_sm80_and_hgmma_on_sm90(report):
    results, _ = report
    sm80, sm90 = (results[("64x64x32 warps=4 stages=2", arch)] for arch in (80, 90))
    assert sm80["problems"] == [] and sm90["problems"] == [], (sm80, sm90)
    assert sm80["tensor_core_ops"] > 0  # HMMA (mma.sync)
    assert sm90["tensor_core_ops"] > 0 and sm90["mma_sync_ops"] == 0  # HGMMA (wgmma), 4 warps = a warpgroup
    assert 0 < sm80["shared"] <= sm80["shared_limit"] and 0 < sm90["shared"] <= sm90["shared_limit"]


def test_dot_with_k8_is_a_compile_error(report):
    results, _ = report
    for r in _rows(results, "broken K=8"):
        assert r["error"] is not None and "K >= 16" in r["error"]
        assert len(r["problems"]) == 1 and r["problems"][0].startswith("compile error")


def test_shared_memory_over_the_opt_in_limit_is_reported(report):
    results, _ = report
    for r in _rows(results, "broken 128x128x128"):
        assert r["error"] is None
        assert r["shared_limit"] == {80: 166912, 90: 232448}[r["arch"]]
        assert r["shared"] > r["shared_limit"]
        assert any(p.startswith("shared memory") for p in r["problems"]), r


def test_main_prints_the_table_and_fails_on_problems(report):
    _, proc = report
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["kernel", "config", "arch"]
    assert any(line.startswith("scale_add_kernel") and "sm_90a" in line and line.endswith("ok") for line in lines)
    assert any("HGMMA" in line for line in lines) and any("HMMA" in line for line in lines)
    assert "Input shapes should have M >= 1, N >= 1 and K >= 16" in proc.stdout
    assert re.search(r"^8 compiled, 4 problems$", proc.stdout, re.MULTILINE), proc.stdout
    assert "[10/10]" in proc.stderr  # progress lines


def _load_in_process():
    try:
        return importlib.import_module("fastgpt_kernels.tools.compile_report")
    except Exception:  # the rest of the package may be mid-edit
        name = "_compile_report_under_test"
        spec = importlib.util.spec_from_file_location(name, MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


def _plain(x):
    return x


def test_interpreted_kernel_is_reported_not_compiled():
    from triton.runtime.interpreter import InterpretedFunction

    cr = _load_in_process()
    result = cr.compile_spec(cr.CompileSpec(InterpretedFunction(_plain), "interp", (1,), {}), 80)
    assert "TRITON_INTERPRET" in result.error
    assert result.problems[0].startswith("compile error")
    with pytest.raises(ValueError, match="arch"):
        cr.compile_spec(cr.CompileSpec(InterpretedFunction(_plain), "interp", (1,), {}), 75)


def test_main_reruns_itself_without_the_interpreter(tmp_path):
    try:
        importlib.import_module("fastgpt_kernels")
    except Exception as exc:
        pytest.skip(f"the kernels package does not import yet ({exc})")
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_cr', {str(MODULE_PATH)!r})\n"
            f"cr = importlib.util.module_from_spec(spec); sys.modules['_cr'] = cr; spec.loader.exec_module(cr)\n"
            f"sys.exit(cr.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "--module", "_compile_report_example", "--kernel", "scale_add",
                           "--arch", "80", "--jobs", "1"], cwd=tmp_path, env=_env(tmp_path, interpret="1"),
                          capture_output=True, text=True, timeout=300)
    assert "re-running with the interpreter off" in proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^2 compiled, 0 problems$", proc.stdout, re.MULTILINE), proc.stdout


def report_of_every_config(op: str, tmp_path) -> list[str]:
    """The output lines of ``python -m fastgpt_kernels.tools.compile_report --op op``, once it has compiled every
    spec of the op for both architectures with no problem."""
    from fastgpt_kernels import registry

    specs = list(registry.declaration(op).compile_specs())
    proc = subprocess.run([sys.executable, "-m", "fastgpt_kernels.tools.compile_report", "--op", op, "--jobs", "2"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert f"\n{2 * len(specs)} compiled, 0 problems" in proc.stdout
    return proc.stdout.splitlines()


def test_every_layer_norm_config_compiles_fits_and_does_not_spill(tmp_path):
    lines = report_of_every_config("layer_norm", tmp_path)
    for kernel in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_dx_kernel", "_layer_norm_bwd_dwdb_kernel"):
        for arch in ("sm_80", "sm_90a"):
            assert any(re.search(rf"^{kernel}\s.*\s{arch}\s", line) for line in lines), (kernel, arch)


def test_every_attention_config_compiles_fits_and_uses_tensor_cores(tmp_path):
    from fastgpt_kernels import _tuning
    from fastgpt_kernels.ops import attention as attn

    lines = report_of_every_config("attention", tmp_path)
    for kind in attn.KINDS:
        for tile in attn.TILES[kind]:
            label = f"{kind} {_tuning.describe(tile.config)} "
            for arch, tensor_cores in (("sm_80", "HMMA"), ("sm_90a", "HGMMA")):
                rows = [line for line in lines if label in line and f" {arch} " in line]
                assert len(rows) >= 7, (label, arch)
                assert all(re.search(rf"\s[1-9]\d* {tensor_cores}\s", row) for row in rows), rows


def test_every_gelu_mlp_config_compiles_fits_and_uses_tensor_cores(tmp_path):
    from fastgpt_kernels import _tuning
    from fastgpt_kernels.ops import gelu_mlp as gm

    lines = report_of_every_config("gelu_mlp", tmp_path)
    for config in gm.CONFIGS:
        for role in ("fc", "proj", "dpre", "dproj_weight", "dx"):
            for dtype in ("float16", "float32"):
                label = re.escape(f"{role} {_tuning.describe(config)} {dtype}")
                for arch, tensor_cores in (("sm_80", "HMMA"), ("sm_90a", "HGMMA")):
                    row = [line for line in lines if re.search(rf"\s{label}\s+{arch}\s", line)]
                    assert len(row) == 1, (label, arch)
                    assert re.search(rf"\s[1-9]\d* {tensor_cores}\s.*\sok$", row[0]), row[0]


def test_every_linear_cross_entropy_config_compiles_fits_and_uses_tensor_cores(tmp_path):
    import torch

    from fastgpt_kernels import _tuning
    from fastgpt_kernels.ops import linear_cross_entropy as lce

    lines = report_of_every_config("linear_cross_entropy", tmp_path)
    for config in lce.CONFIGS:
        for role in ("loss", "dlogits", "dx", "dweight"):
            for dtype in ("float16", "bfloat16", "float32"):
                if role in ("loss", "dlogits") and config not in lce.logits_configs(getattr(torch, dtype)):
                    continue
                if role == "dweight" and config not in lce.DWEIGHT_CONFIGS:
                    continue  # left out of the weight gradient (it spills there)
                label = re.escape(f"{role} {_tuning.describe(config)} {dtype}")
                for arch, tensor_cores in (("sm_80", "HMMA"), ("sm_90a", "HGMMA")):
                    row = [line for line in lines if re.search(rf"\s{label}\s+{arch}\s", line)]
                    assert len(row) == 1, (label, arch)
                    assert re.search(rf"\s[1-9]\d* {tensor_cores}\s.*\sok$", row[0]), row[0]
    assert any("int64 offsets" in line for line in lines)
