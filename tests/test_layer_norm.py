"""fastgpt_kernels.layer_norm: the Triton kernels against float64, by the 2x-PyTorch rule (see fastgpt_kernels.tools.verify)."""
import math

import pytest
import torch

import fastgpt_kernels
from conftest import ALL_DTYPES, DEVICE, assert_backward_deterministic, output_mutants, scale_after_launch
from fastgpt_kernels.ops import layer_norm as ln
from fastgpt_kernels.registry.layer_norm import checks as layer_norm_checks
from fastgpt_kernels.tools.checking import assert_pass


# Width 1 is degenerate (y = bias, dx = dweight = 0 exactly); width 2 is its partner with
# gradients that are not zero.
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("width", [1, 2, 7, 1023, 4097])
@pytest.mark.parametrize("rows", [1, 3, 257])
def test_forward_and_gradients(rows, width, dtype):
    assert_pass(layer_norm_checks(rows, width, dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("width", [1, 7, 1023, 4097])
def test_without_weight_or_bias(width, affine, dtype):
    checks = layer_norm_checks(3, width, dtype, affine, device=DEVICE)
    assert {c.tensor for c in checks} == {"out", "dx"} | {n for n, on in zip(("dweight", "dbias"), affine) if on}
    assert_pass(checks)


# One width per launch configuration block_config() can choose, so every BLOCK_N/num_warps
# specialisation runs; 8193 and 65536 take the chunked kernels (8193 ends in a 1-element chunk).
CONFIG_WIDTHS = [1, 129, 257, 1023, 1500, 4000, 4097, 8193, 65536]


def test_config_widths_cover_every_launch_config():
    configs = {ln.block_config(n) for n in CONFIG_WIDTHS}
    assert configs == set(ln.launch_configs())


@pytest.mark.parametrize("width", CONFIG_WIDTHS)
def test_every_launch_config(width):
    assert_pass(layer_norm_checks(2, width, torch.float32, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_chunked_kernels_in_low_precision(dtype):
    assert_pass(layer_norm_checks(3, 8193, dtype, device=DEVICE))


@pytest.mark.parametrize("view", ["padded", "strided"])
def test_non_contiguous_input(view):
    assert_pass(layer_norm_checks(5, 100, torch.float32, device=DEVICE, view=view))


def test_leading_dimensions_and_transposed_input():
    base = torch.randn(5, 2, 33, device=DEVICE, dtype=torch.float32)
    x = base.transpose(0, 1)  # (2, 5, 33): rows are not evenly strided
    weight, bias = torch.randn(33, device=DEVICE), torch.randn(33, device=DEVICE)
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.layer_norm(x, weight, bias)
    expected = torch.nn.functional.layer_norm(x.double(), (33,), weight.double(), bias.double())
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_contiguous_leading_dimensions_reach_the_kernels_as_they_are():
    """A contiguous (B, T, N) input needs no (rows, N) view: the kernels get it and write y in its shape."""
    from fastgpt_kernels.ops._common import run

    x, weight, bias = (torch.randn(shape, device=DEVICE) for shape in ((2, 3, 40), (40,), (40,)))
    (y, mean, rstd), [(_, grid, args, _)] = plan = ln.forward_plan(x, weight, bias, 1e-5)
    assert args[0] is x and y.shape == x.shape and grid == (6,) and mean.shape == (6,)
    run(plan)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (40,), weight, bias))
    dy = torch.randn(2, 3, 40, device=DEVICE)
    (dx, dweight, dbias), launches = ln.backward_plan(dy, x, weight, True, mean, rstd)
    assert launches[0][2][:2] == (x, dy) and dx.shape == x.shape
    run(((dx, dweight, dbias), launches))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = torch.autograd.grad(torch.nn.functional.layer_norm(leaves[0], (40,), *leaves[1:]), leaves, dy)
    for got, want in zip((dx, dweight, dbias), expected):
        torch.testing.assert_close(got, want)


def test_large_mean_is_numerically_stable():
    # A one-pass E[x^2] - E[x]^2 variance loses everything here; the kernels must not.
    x = 1e4 + torch.randn(2, 8193, device=DEVICE, dtype=torch.float32)
    for width in (1023, 8193):
        with fastgpt_kernels.use_backend("triton"):
            got = fastgpt_kernels.layer_norm(x[:, :width], None)
        expected = torch.nn.functional.layer_norm(x[:, :width].double(), (width,))
        assert (got.double() - expected).abs().max() < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("rows, width", [(600, 768), (200, 8193)])
def test_backward_as_planned_for_a_gpu_with_132_multiprocessors(rows, width):
    """On a GPU the backward spreads the rows over 4 programs per multiprocessor (1 for chunked
    rows), each with its own partial sums; here that plan runs in the interpreter."""
    from fastgpt_kernels.ops._common import run

    gen = torch.Generator().manual_seed(0)
    x, weight, bias, dy = (torch.randn(*shape, generator=gen).to(DEVICE) for shape in ((rows, width), (width,),
                                                                                         (width,), (rows, width)))
    y, mean, rstd = run(ln.forward_plan(x, weight, bias, 1e-5))
    (dx, dweight, dbias), launches = ln.backward_plan(dy, x, weight, True, mean, rstd, sms=132)
    programs = launches[0][1][0]
    assert programs == rows // 2  # min(rows, 4 * 132 or 132) programs, 2 rows each
    reduce_programs = launches[1][1][0]
    assert reduce_programs == {768: 24, 8193: 129}[width]  # 32 and 64 columns each: at least 132 programs, or 32 columns
    run(((dx, dweight, dbias), launches))
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected = torch.autograd.grad(torch.nn.functional.layer_norm(leaves[0], (width,), *leaves[1:]), leaves, dy.double())
    for got, want in zip((dx, dweight, dbias), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_backward_is_deterministic():
    """Partial sums reduced in a fixed order: bit-identical gradients from two runs. In Triton's interpreter the programs run one
    after another, so this cannot fail here; on a GPU (``python -m bench.gpu_report``: its tests stage
    runs this file, its determinism stage every op at GPT-2 size) it can."""
    x = torch.randn(64, 300, device=DEVICE, requires_grad=True)
    weight = torch.randn(300, device=DEVICE, requires_grad=True)
    bias = torch.randn(300, device=DEVICE, requires_grad=True)
    assert_backward_deterministic(fastgpt_kernels.layer_norm, (x, weight, bias), torch.randn(64, 300, device=DEVICE))


def test_empty_batch():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    with fastgpt_kernels.use_backend("triton"):
        y = fastgpt_kernels.layer_norm(x, weight)
        y.sum().backward()
    assert y.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros(16, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
class TestBadInput:
    def test_weight_shape(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
            fastgpt_kernels.layer_norm(torch.randn(2, 8), torch.randn(7))

    def test_bias_shape(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            fastgpt_kernels.layer_norm(torch.randn(2, 8), None, torch.randn(2, 8))

    def test_integer_dtype(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
            fastgpt_kernels.layer_norm(torch.ones(2, 8, dtype=torch.long), None)

    def test_not_a_tensor(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
            fastgpt_kernels.layer_norm(torch.randn(2, 8), [1.0] * 8)

    def test_dtype_mismatch(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
            fastgpt_kernels.layer_norm(torch.randn(2, 8), torch.randn(8, dtype=torch.float16))

    def test_different_devices(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
            fastgpt_kernels.layer_norm(torch.randn(2, 8), torch.randn(8, device="meta"))

    @pytest.mark.parametrize("eps", [math.nan, math.inf, -1e-5])
    def test_bad_eps(self, backend, eps):
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=f"eps must be finite and >= 0, got {eps}"):
            fastgpt_kernels.layer_norm(torch.randn(2, 8), None, eps=eps)

    def test_empty_last_dimension(self, backend):
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"non-empty last dimension.*\(3, 0\)"):
            fastgpt_kernels.layer_norm(torch.randn(3, 0), None)


def test_float64_falls_back_under_auto_and_is_refused_under_triton():
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    with fastgpt_kernels.use_backend("auto"):
        torch.testing.assert_close(fastgpt_kernels.layer_norm(x, None), torch.nn.functional.layer_norm(x, (8,)))
    with fastgpt_kernels.use_backend("triton"), pytest.raises(fastgpt_kernels.KernelUnavailableError, match="x has dtype torch.float64"):
        fastgpt_kernels.layer_norm(x, None)


def test_torch_compile_keeps_the_kernel_in_one_graph():
    weight = torch.randn(64, device=DEVICE, requires_grad=True)
    bias = torch.randn(64, device=DEVICE, requires_grad=True)

    def block(x):
        return torch.relu(fastgpt_kernels.layer_norm(x * 2, weight, bias)) + 1

    compiled = torch.compile(block, fullgraph=True)  # fails on any graph break
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    with fastgpt_kernels.use_backend("triton"):
        got = compiled(x)
        got.sum().backward()
    grads = (x.grad, weight.grad, bias.grad)
    x.grad = weight.grad = bias.grad = None
    with fastgpt_kernels.use_backend("torch"):
        expected = block(x)
        expected.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, (x.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_the_sm_count_is_the_cuda_devices_and_none_elsewhere(monkeypatch):
    from types import SimpleNamespace

    from fastgpt_kernels.ops import _common

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: asked.append(device) or SimpleNamespace(multi_processor_count=132))
    _common.sm_count.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert _common.sm_count(cuda) == 132 and _common.sm_count(cuda) == 132
        assert asked == [cuda]  # asked once per device, then cached
        assert _common.sm_count(torch.device("cpu")) is None
    finally:
        _common.sm_count.cache_clear()


# --------------------------------------------------------------------------- verify catches a wrong LayerNorm


LAYER_NORM_MUTANTS = output_mutants(("dx", "dweight", "dbias"))


def layer_norm_names(plan):
    forward = plan[1] and plan[1][0][0] is ln._layer_norm_fwd_kernel
    return ("out", "mean", "rstd") if forward else ("dx", "dweight", "dbias")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mutant", LAYER_NORM_MUTANTS)
def test_verify_fails_a_wrong_output_or_gradient(monkeypatch, dtype, mutant):
    """The kernels' results made wrong after their launches, at the suite's largest one-block shape:
    every mutant must fail verify's bound for its tensor, and only that one."""
    tensor, factor = LAYER_NORM_MUTANTS[mutant]
    scale_after_launch(monkeypatch, ln, layer_norm_names, tensor, factor)
    checks = {c.tensor: c for c in layer_norm_checks(257, 4097, dtype, device=DEVICE)}
    assert not checks[tensor].passed, f"verify passed {mutant}: {checks[tensor]}"
    assert all(c.passed for name, c in checks.items() if name != tensor)


def layer_norm_without_the_statistics_terms(x, weight, bias, eps):
    """LayerNorm whose backward drops the terms through the mean and variance: dx = rstd * weight * dy
    (the statistics held constant). The forward is exact."""
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True).detach()
    rstd = torch.rsqrt(x32.var(-1, unbiased=False, keepdim=True) + eps).detach()
    return ((x32 - mean) * rstd * weight.float() + bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_verify_fails_a_backward_without_the_statistics_terms(monkeypatch, dtype):
    monkeypatch.setattr(ln, "layer_norm", layer_norm_without_the_statistics_terms)
    checks = {c.tensor: c for c in layer_norm_checks(257, 4097, dtype, device=DEVICE)}
    assert not checks["dx"].passed, str(checks["dx"])


@pytest.mark.skipif(DEVICE == "cuda", reason="allocates 4 GiB of storage (untouched on a CPU)")
def test_offsets_past_2_31_elements_forward_and_backward():
    """x's and dy's rows 2^30 + 16 elements apart: row 2 starts past 2^31, so the row offsets of
    the forward and of the backward's dx are int64."""
    gen = torch.Generator().manual_seed(0)
    values, dy_values, weight, bias = (torch.randn(*shape, generator=gen) for shape in ((3, 40), (3, 40), (40,), (40,)))

    def far_apart(v):
        storage = torch.empty(2 * (2**30 + 16) + 40, dtype=torch.float16)
        view = storage.as_strided((3, 40), (2**30 + 16, 1))
        view.copy_(v)
        return view

    x, dy = far_apart(values), far_apart(dy_values)
    leaves = [x.requires_grad_(), weight.half().requires_grad_(), bias.half().requires_grad_()]
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.layer_norm(*leaves)
        grads = torch.autograd.grad(got, leaves, dy)
    exact = [t.detach().double().requires_grad_() for t in (values.half(), weight.half(), bias.half())]
    want = torch.nn.functional.layer_norm(exact[0], (40,), *exact[1:])
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    for name, g, w in zip(("dx", "dweight", "dbias"), grads,
                          torch.autograd.grad(want, exact, dy_values.half().double())):
        torch.testing.assert_close(g.double(), w, rtol=2e-3, atol=2e-3 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
