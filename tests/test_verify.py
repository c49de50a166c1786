"""python -m fastgpt_kernels.tools.verify: the user-facing verification command."""
import pytest
import torch

import fastgpt_kernels
from fastgpt_kernels import registry
from fastgpt_kernels.ops import layer_norm as ln
from fastgpt_kernels.tools import checking, verify
from conftest import run_python


@pytest.mark.slow
def test_command_passes_and_starts_the_interpreter_itself():
    result = run_python("import sys; from fastgpt_kernels.tools import verify; sys.exit(verify.main(['--dtype', 'float32']))",
                        TRITON_INTERPRET=None, FASTGPT_BACKEND=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dweight" in result.stdout and "FAIL" not in result.stdout
    assert "passed, 0 failed" in result.stdout.splitlines()[-1]


def test_command_fails_on_a_wrong_kernel(monkeypatch, capsys):
    def slightly_wrong(x, weight, bias, eps):
        return fastgpt_kernels.reference.layer_norm(x, weight, bias, eps) * 1.01

    monkeypatch.setattr(ln, "layer_norm", slightly_wrong)
    monkeypatch.setattr(verify, "cases", lambda grid, dtypes: [verify.Case("layer_norm", (3, 7, torch.float32))])
    assert verify.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "first at" in out
    assert " failed" in out and " 0 failed" not in out


def test_unwritten_output_elements_fail(monkeypatch):
    def leaves_last_column(x, weight, bias, eps):
        y = torch.empty_like(x)  # poisoned by verify
        y[..., :-1] = fastgpt_kernels.reference.layer_norm(x, weight, bias, eps)[..., :-1]
        return y

    monkeypatch.setattr(ln, "layer_norm", leaves_last_column)
    checks = registry.declaration("layer_norm").checks(3, 7, torch.float32)
    assert not next(c for c in checks if c.tensor == "out").passed


def test_without_triton_the_command_says_why():
    code = "import sys; sys.modules['triton'] = None; from fastgpt_kernels.tools import verify; sys.exit(verify.main([]))"
    result = run_python(code, TRITON_INTERPRET=None)
    assert result.returncode == 2
    assert "cannot verify the Triton kernels: triton is not importable" in result.stderr


def test_the_gpu_grid_skips_what_the_kernels_do_not_take_instead_of_raising(monkeypatch, capsys):
    """The GPU grid has float32 attention at D=128, which the kernels do not take: it is reported
    as skipped with the reason. Checks are replaced by a stub here: this is a dry run of the loop."""
    ran = []

    def pretend(case, device):
        ran.append(case)
        return [checking.Check(case.op, "stub", "float32", "out", 0.0, 0.0, 1.0)]

    monkeypatch.setattr(verify.Case, "run", pretend)
    assert verify.main(["--grid", "gpu"]) == 0
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if " SKIP " in line]
    assert len(skips) == 1
    assert "2 16 2048 128 float32" in skips[0] and "D=128 in float32 is not supported" in skips[0]
    assert len(ran) == len(verify.cases("gpu", verify.DTYPES.values())) - 1
    assert "0 failed, 1 cases skipped" in out.splitlines()[-1]


def test_dry_run_lists_every_case_with_the_kernels_decision_without_computing(capsys):
    assert verify.main(["--dry-run", "--grid", "gpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cases = verify.cases("gpu", verify.DTYPES.values())
    assert len(lines) == len(cases) + 1
    assert sum(" SKIP " in line for line in lines) == 1
    assert lines[-1] == f"{len(cases)} cases in the gpu grid: {len(cases) - 1} run, 1 skipped"


def test_every_case_of_both_grids_is_supported_or_skipped_with_a_reason():
    for grid in verify.GRIDS:
        for case, reason in verify.dry_run(grid, verify.DTYPES.values()):
            assert reason is None or (case.dtype == torch.float32 and "float32" in reason), case.describe()


def test_where_tf32_is_in_force_the_atol_of_every_op_with_dots_uses_its_eps(monkeypatch):
    """On a GPU float32 dots run in TF32 (10 mantissa bits): the atol scales of attention, the MLP
    and the fused loss grow by TF32's eps over float32's; LayerNorm and the MLP's dproj_bias (a sum of
    dout) come from no dot and keep theirs."""
    runs = {
        "attention": lambda: registry.declaration("attention").checks(1, 2, 17, 16, torch.float32),
        "gelu_mlp": lambda: registry.declaration("gelu_mlp").checks(7, 16, 64, torch.float32),
        "linear_cross_entropy": lambda: registry.declaration("linear_cross_entropy").checks(9, 16, 40, torch.float32),
        "layer_norm": lambda: registry.declaration("layer_norm").checks(3, 16, torch.float32),
    }
    for op, run in runs.items():
        plain = {c.tensor: c.bound - 2 * c.torch_error for c in run()}
        with monkeypatch.context() as m:
            for declared in registry.declarations():  # each declaration's bounds ask whether TF32 is in force
                m.setattr(declared, "tf32_in_force", lambda dtype, device: dtype == torch.float32, raising=False)
            tf32 = {c.tensor: c.bound - 2 * c.torch_error for c in run()}
        for tensor, atol in plain.items():
            ratio = tf32[tensor] / atol
            if op == "layer_norm" or tensor == "dproj_bias":
                assert ratio == 1, (op, tensor)
            else:  # the MLP's also adds the error TF32 carries from one GEMM into the next
                assert ratio >= 0.99 * checking.TF32_EPS / torch.finfo(torch.float32).eps, (op, tensor, ratio)
