"""The backend switch in fastgpt_kernels._dispatch: policies, environment variable, fallbacks, errors."""
import pytest
import torch

import fastgpt_kernels
from conftest import DEVICE, run_python
from fastgpt_kernels import _dispatch


# Under auto the reference runs; under explicit triton the error says why the kernel cannot.
FALLBACK_CHECK = """
    import torch, fastgpt_kernels
    from fastgpt_kernels import _dispatch
    x = torch.randn(2, 8)
    assert not _dispatch.INTERPRETED
    assert not _dispatch.use_kernel("layer_norm", x, None, None)
    torch.testing.assert_close(fastgpt_kernels.layer_norm(x, None), torch.nn.functional.layer_norm(x, (8,)))
    fastgpt_kernels.set_backend("triton")
    try:
        fastgpt_kernels.layer_norm(x, None)
    except fastgpt_kernels.KernelUnavailableError as exc:
        print(exc)
    else:
        raise SystemExit("explicit triton ran without a device that can run the kernel")
"""


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="checks CPU tensors without the interpreter")
def test_cpu_without_interpreter_uses_reference_and_explicit_triton_says_why():
    result = run_python(FALLBACK_CHECK, TRITON_INTERPRET=None, FASTGPT_BACKEND=None)
    assert result.returncode == 0, result.stderr
    assert "the tensors are on cpu; the Triton kernels need CUDA tensors" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


@pytest.mark.slow
def test_without_triton_everything_runs_through_the_references():
    block_triton = "\n    import sys\n    sys.modules['triton'] = None  # makes `import triton` fail"
    result = run_python(block_triton + FALLBACK_CHECK, FASTGPT_BACKEND=None)
    assert result.returncode == 0, result.stderr
    assert "triton is not importable" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("value", ["torch", "triton", "auto"])
def test_environment_variable_sets_the_policy(value):
    result = run_python("import fastgpt_kernels; print(fastgpt_kernels.get_backend())", FASTGPT_BACKEND=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == value


def test_unknown_environment_value_is_refused_by_name():
    # Read when the ops are first used (importing the package loads none of them).
    result = run_python("import fastgpt_kernels; fastgpt_kernels.layer_norm", FASTGPT_BACKEND="cuda")
    assert result.returncode != 0
    assert "unknown backend 'cuda': expected one of auto, triton, torch" in result.stderr


def test_set_backend_and_context_manager():
    assert fastgpt_kernels.get_backend() == "auto"
    with fastgpt_kernels.use_backend("torch"):
        assert fastgpt_kernels.get_backend() == "torch"
        with fastgpt_kernels.use_backend("triton"):
            assert fastgpt_kernels.get_backend() == "triton"
        assert fastgpt_kernels.get_backend() == "torch"
    assert fastgpt_kernels.get_backend() == "auto"
    fastgpt_kernels.set_backend("torch")
    try:
        assert fastgpt_kernels.get_backend() == "torch"
    finally:
        fastgpt_kernels.set_backend("auto")


def test_context_manager_restores_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with fastgpt_kernels.use_backend("torch"):
            1 / 0
    assert fastgpt_kernels.get_backend() == "auto"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastgpt_kernels.set_backend("gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with fastgpt_kernels.use_backend("gpu"):
            pass


def test_policy_decides_which_implementation_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(_dispatch.kernel_module("layer_norm"), "layer_norm", lambda *a: calls.append("kernel") or a[0])
    monkeypatch.setattr(fastgpt_kernels.reference, "layer_norm", lambda *a: calls.append("reference") or a[0])
    x = torch.randn(2, 8, device=DEVICE)
    for backend in ("auto", "triton", "torch"):
        with fastgpt_kernels.use_backend(backend):
            fastgpt_kernels.layer_norm(x, None)
    assert calls == ["kernel", "kernel", "reference"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_the_inputs_on_both_backends(backend):
    """Under bfloat16 autocast, float32 inputs run the MLP and attention in bfloat16 (as F.linear and
    SDPA do) and LayerNorm in float32, whichever backend runs; float32 leaves get float32 gradients."""
    from conftest import BF16_SKIP_REASON

    if backend == "triton" and BF16_SKIP_REASON:
        pytest.skip(BF16_SKIP_REASON)
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE).requires_grad_()

    x, w1, b1, w2, b2 = leaf(5, 32), leaf(128, 32, scale=0.2), leaf(128), leaf(32, 128, scale=0.1), leaf(32)
    q, k, v = leaf(1, 2, 17, 16), leaf(1, 2, 17, 16), leaf(1, 2, 17, 16)
    ln_w, ln_b = leaf(32), leaf(32)
    with fastgpt_kernels.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        mlp = fastgpt_kernels.gelu_mlp(x, w1, b1, w2, b2)
        att = fastgpt_kernels.attention(q, k, v)
        ln = fastgpt_kernels.layer_norm(x.bfloat16(), ln_w, ln_b)
    assert (mlp.dtype, att.dtype, ln.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    with fastgpt_kernels.use_backend("torch"):
        bf16 = [t.detach().bfloat16() for t in (x, w1, b1, w2, b2, q, k, v)]
        torch.testing.assert_close(mlp, fastgpt_kernels.gelu_mlp(*bf16[:5]), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(att, fastgpt_kernels.attention(*bf16[5:]), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ln, fastgpt_kernels.layer_norm(x.detach().bfloat16().float(), ln_w.detach(), ln_b.detach()))
    with fastgpt_kernels.use_backend("torch"), torch.autocast(DEVICE, dtype=torch.bfloat16):  # float64 is left alone
        assert fastgpt_kernels.layer_norm(x.detach().double(), None).dtype == torch.float64
    leaves = (x, w1, b1, w2, b2, q, k, v, ln_w, ln_b)
    dmlp, datt, dln = (torch.randn(t.shape, generator=gen).to(DEVICE) for t in (mlp, att, ln))
    ((mlp.float() * dmlp).sum() + (att.float() * datt).sum() + (ln * dln).sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    # The values: PyTorch's ops on the inputs autocast made (bfloat16 copies; LayerNorm's x too),
    # gradients taken back to float32 at the casts.
    cast = [t.detach().bfloat16().requires_grad_() for t in leaves[:8]]
    ln_leaves = [x.detach().bfloat16().float().requires_grad_(), ln_w.detach().requires_grad_(),
                 ln_b.detach().requires_grad_()]
    with fastgpt_kernels.use_backend("torch"):
        ((fastgpt_kernels.gelu_mlp(*cast[:5]).float() * dmlp).sum()
         + (fastgpt_kernels.attention(*cast[5:]).float() * datt).sum()
         + (fastgpt_kernels.layer_norm(*ln_leaves) * dln).sum()).backward()
    expected = [t.grad.float() for t in cast] + [g.grad for g in ln_leaves[1:]]
    expected[0] = expected[0] + ln_leaves[0].grad  # x feeds both the MLP and LayerNorm
    for name, t, want in zip(("x", "w1", "b1", "w2", "b2", "q", "k", "v", "ln_w", "ln_b"), leaves, expected):
        torch.testing.assert_close(t.grad, want, rtol=2e-2, atol=2e-2 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_a_triton_older_than_the_floor_is_refused_with_the_reason_and_everything_falls_back():
    # triton 3.3 has no triton.knobs; importing kernels used to die with an AttributeError.
    old_triton = """
    import sys, types
    fake = types.ModuleType("triton")
    fake.__version__ = "3.3.1"
    sys.modules["triton"] = fake
    """
    result = run_python(old_triton + FALLBACK_CHECK.replace("assert not _dispatch.INTERPRETED", ""),
                        FASTGPT_BACKEND=None)
    assert result.returncode == 0, result.stderr
    assert "triton 3.3.1 is older than 3.5, the oldest the kernels support" in result.stdout
    verify = run_python(old_triton + "from fastgpt_kernels.tools import verify; raise SystemExit(verify.main([]))",
                        FASTGPT_BACKEND=None)
    assert verify.returncode == 2 and "cannot verify the Triton kernels: triton 3.3.1 is older" in verify.stderr


@pytest.mark.parametrize("version, interpreted, numpy_version, problem", [
    ("3.4.0", False, "2.3.5", "older than 3.5"),
    ("3.5.1", False, "2.4.1", None),
    ("3.6.0+git1a2b3c", True, "2.4.1", "interpreter cannot run the kernels with numpy 2.4.1"),
    ("3.6.0", True, "2.3.5", None),
    ("3.7.0", True, "2.4.0", "fixed in triton 3.7.1"),
    ("3.7.1", True, "2.4.1", None),
    ("3.9.0", False, "2.5.0", None),
])
def test_triton_versions_that_cannot_run_the_kernels_are_named(version, interpreted, numpy_version, problem):
    found = _dispatch.triton_problem(version, interpreted, numpy_version)
    assert (found is None) if problem is None else (problem in found)


def test_pyproject_declares_the_floors_the_code_enforces():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"triton>=([\d.]+)', text).group(1)
    assert tuple(int(p) for p in floor.split(".")) == _dispatch.TRITON_FLOOR
    assert re.search(r'"torch>=2\.9"', text)  # the first torch whose CUDA builds bring triton 3.5


def test_float32_runs_the_kernels_only_while_pytorch_uses_tf32():
    """The kernels' float32 dots run in TF32, so they take float32 only while PyTorch's own float32
    matmuls do; in full precision (PyTorch's default) PyTorch's ops run float32, as asked."""
    from fastgpt_kernels.ops import attention, gelu_mlp
    from fastgpt_kernels.ops._common import FLOAT32_NEEDS_TF32

    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    x, w1, w2 = torch.randn(4, 16, device=DEVICE), torch.randn(64, 16, device=DEVICE), torch.randn(16, 64, device=DEVICE)
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # the autouse fixture restores it
    assert attention.why_unsupported(q, q, q) == FLOAT32_NEEDS_TF32
    assert gelu_mlp.why_unsupported(x, w1, None, w2, None) == FLOAT32_NEEDS_TF32
    assert attention.supports(q.half(), q.half(), q.half())
    assert _dispatch.kernel_module("layer_norm").supports(x)  # no dots: float32 is always taken
    with fastgpt_kernels.use_backend("triton"), pytest.raises(fastgpt_kernels.KernelUnavailableError, match="run in full precision"):
        fastgpt_kernels.attention(q, q, q)
    with fastgpt_kernels.use_backend("auto"):
        torch.testing.assert_close(fastgpt_kernels.gelu_mlp(x, w1, None, w2, None), fastgpt_kernels.reference.gelu_mlp(x, w1, None, w2, None))
    torch.set_float32_matmul_precision("high")  # PyTorch's float32 matmuls in TF32: the kernels take float32
    try:
        assert attention.supports(q, q, q) and gelu_mlp.supports(x, w1, None, w2, None)
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(_dispatch.NO_TRITON_REASON is not None, reason="needs the kernel modules")
def test_cuda_tensors_take_the_kernel_and_fall_back_with_one_warning_per_reason(monkeypatch):
    """The branches only CUDA tensors take, run here with stand-ins for them (the attributes the
    dispatch reads): the kernel is taken; a fallback warns once per op and reason."""
    import warnings
    from types import SimpleNamespace

    def cuda(dtype):
        return SimpleNamespace(is_cuda=True, is_cpu=False, dtype=dtype)

    monkeypatch.setattr(_dispatch, "_warned", set())
    with fastgpt_kernels.use_backend("auto"):
        assert _dispatch.use_kernel("layer_norm", cuda(torch.float16), None, None)
        with pytest.warns(RuntimeWarning, match="fastgpt_kernels.layer_norm: using the PyTorch reference: x has dtype "
                                                "torch.float64"):
            assert not _dispatch.use_kernel("layer_norm", cuda(torch.float64), None, None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _dispatch.use_kernel("layer_norm", cuda(torch.float64), None, None)  # warned already


@pytest.mark.skipif(_dispatch.NO_TRITON_REASON is not None, reason="needs the kernel modules")
def test_a_plan_on_another_gpu_launches_with_that_gpu_current(monkeypatch):
    """Triton launches on the current device: tensors on cuda:1 while cuda:0 is current (one process,
    ``--device cuda:1``) must launch with cuda:1 current. Stand-ins for the tensors and for
    torch.cuda's current device."""
    import contextlib
    from types import SimpleNamespace

    from fastgpt_kernels.ops import _common

    current = [0]

    @contextlib.contextmanager
    def device(index):
        previous, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    launched_on = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched_on.append(current[0])

    def on_gpu(index):
        return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))

    plan = ("outputs", [(Kernel(), (1,), (on_gpu(1), 7), {}), (Kernel(), (2,), (on_gpu(1),), {"BLOCK": 16})])
    assert _common.run(plan) == "outputs"
    assert launched_on == [1, 1] and current[0] == 0  # cuda:1 for the launches, cuda:0 again after
    _common.run((None, [(Kernel(), (1,), (on_gpu(0),), {})]))
    assert launched_on[-1] == 0


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bfloat16 is a CPU matter")
def test_without_the_shim_the_interpreter_never_computes_bfloat16():
    # Triton's interpreter computes bfloat16 on bit patterns: the fused loss came out near 1e10.
    # Without the verification shim, auto takes the reference and triton refuses, by name.
    result = run_python("""
        import torch, fastgpt_kernels
        from fastgpt_kernels import _dispatch, reference
        assert _dispatch.INTERPRETED and not _dispatch.interpreter_computes_bf16
        torch.manual_seed(0)
        x, w, t = torch.randn(64, 64), torch.randn(1000, 64) * 0.02, torch.randint(0, 1000, (64,))
        expected = reference.linear_cross_entropy(x.bfloat16(), w.bfloat16(), None, t, -1, "mean")
        for args in ((x.bfloat16(), w.bfloat16()), (x, w)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args[0].dtype == torch.float32):
                got = fastgpt_kernels.linear_cross_entropy(*args, t, ignore_index=-1)
                torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
                with fastgpt_kernels.use_backend("triton"):
                    try:
                        fastgpt_kernels.linear_cross_entropy(*args, t, ignore_index=-1)
                    except fastgpt_kernels.KernelUnavailableError as exc:
                        assert "computes bfloat16 on its bit patterns" in str(exc), exc
                    else:
                        raise AssertionError("the interpreter ran bfloat16")
        with fastgpt_kernels.use_backend("triton"):  # float16 still runs the kernel
            fastgpt_kernels.linear_cross_entropy(x.half(), w.half(), t, ignore_index=-1)
        from fastgpt_kernels.tools import bf16_shim
        bf16_shim.install_bf16_shim()
        with fastgpt_kernels.use_backend("triton"):
            got = fastgpt_kernels.linear_cross_entropy(x.bfloat16(), w.bfloat16(), t, ignore_index=-1)
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
        print("ok")
    """, TRITON_INTERPRET="1", FASTGPT_BACKEND=None)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
