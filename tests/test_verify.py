"""python -m kernels.tools.verify: the user-facing verification command."""
import torch

import kernels
from kernels.ops import layer_norm as ln
from kernels.tools import verify
from test_dispatch import run_python


def test_command_passes_and_starts_the_interpreter_itself():
    result = run_python("import sys; from kernels.tools import verify; sys.exit(verify.main(['--dtype', 'float32']))",
                        TRITON_INTERPRET=None, FASTGPT_BACKEND=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dweight" in result.stdout and "FAIL" not in result.stdout
    assert "passed, 0 failed" in result.stdout.splitlines()[-1]


def test_command_fails_on_a_wrong_kernel(monkeypatch, capsys):
    def slightly_wrong(x, weight, bias, eps):
        return kernels.reference.layer_norm(x, weight, bias, eps) * 1.01

    monkeypatch.setattr(ln, "layer_norm", slightly_wrong)
    monkeypatch.setattr(verify, "cases", lambda grid, dtypes: [verify.Case("layer_norm", (3, 7, torch.float32))])
    assert verify.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "first at" in out
    assert " failed" in out and " 0 failed" not in out


def test_unwritten_output_elements_fail(monkeypatch):
    def leaves_last_column(x, weight, bias, eps):
        y = torch.empty_like(x)  # poisoned by verify
        y[..., :-1] = kernels.reference.layer_norm(x, weight, bias, eps)[..., :-1]
        return y

    monkeypatch.setattr(ln, "layer_norm", leaves_last_column)
    checks = verify.layer_norm_checks(3, 7, torch.float32)
    assert not next(c for c in checks if c.tensor == "out").passed


def test_without_triton_the_command_says_why():
    code = "import sys; sys.modules['triton'] = None; from kernels.tools import verify; sys.exit(verify.main([]))"
    result = run_python(code, TRITON_INTERPRET=None)
    assert result.returncode == 2
    assert "cannot verify the Triton kernels: triton is not importable" in result.stderr
