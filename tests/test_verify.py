"""python -m kernels.verify: the user-facing verification command."""
import importlib

import torch

import kernels
from kernels import verify
from test_dispatch import run_python

ln = importlib.import_module("kernels.layer_norm")


def test_command_passes_and_starts_the_interpreter_itself():
    result = run_python("import sys; from kernels import verify; sys.exit(verify.main(['--dtype', 'float32']))",
                        TRITON_INTERPRET=None, FASTGPT_BACKEND=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dweight" in result.stdout and "FAIL" not in result.stdout
    assert result.stdout.rstrip().endswith("passed, 0 failed")


def test_command_fails_on_a_wrong_kernel(monkeypatch, capsys):
    def slightly_wrong(x, weight, bias, eps):
        return kernels.reference.layer_norm(x, weight, bias, eps) * 1.01

    monkeypatch.setattr(ln, "layer_norm", slightly_wrong)
    monkeypatch.setattr(verify, "cases", lambda device, dtypes: [lambda: verify.layer_norm_checks(3, 7, torch.float32)])
    assert verify.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "first at" in out
    assert out.rstrip().endswith("failed") and not out.rstrip().endswith(" 0 failed")


def test_unwritten_output_elements_fail(monkeypatch):
    def leaves_last_column(x, weight, bias, eps):
        y = torch.empty_like(x)  # poisoned by verify
        y[..., :-1] = kernels.reference.layer_norm(x, weight, bias, eps)[..., :-1]
        return y

    monkeypatch.setattr(ln, "layer_norm", leaves_last_column)
    checks = verify.layer_norm_checks(3, 7, torch.float32)
    assert not next(c for c in checks if c.tensor == "out").passed


def test_without_triton_the_command_says_why():
    code = "import sys; sys.modules['triton'] = None; from kernels import verify; sys.exit(verify.main([]))"
    result = run_python(code, TRITON_INTERPRET=None)
    assert result.returncode == 2
    assert "cannot verify the Triton kernels: triton is not importable" in result.stderr
