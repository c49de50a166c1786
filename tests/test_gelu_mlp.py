"""fastgpt_kernels.gelu_mlp: the Triton GEMMs against float64 by the 2x-PyTorch rule (see fastgpt_kernels.tools.verify), every
autotune config, odd sizes and layouts, memory traffic in the interpreter, bad input, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import fastgpt_kernels
from conftest import (ALL_DTYPES, DEVICE, assert_backward_deterministic, float32_tolerance, output_mutants,
                      scale_after_launch)
from fastgpt_kernels import _dispatch, _tuning
from fastgpt_kernels.ops import gelu_mlp as gm
from fastgpt_kernels.ops import _gemm
from fastgpt_kernels.ops._gemm import needs_wide
from fastgpt_kernels.registry.gelu_mlp import checks as gelu_mlp_checks
from fastgpt_kernels.tools.checking import assert_close_to_exact, assert_pass

ROWS = [1, 7, 100, 257]
WIDTHS = [16, 48, 100, 128]
CONFIG_IDS = [_tuning.describe(c).replace(" ", "-") for c in gm.CONFIGS]
GEMMS = ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight")


def every_gemm(config):
    """Pins ``config`` for each of the MLP's GEMM kernels."""
    return fastgpt_kernels.use_configs(dict.fromkeys(GEMMS, config))


def mlp_inputs(rows=5, width=16, hidden=64, dtype=torch.float32, biases=True, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "x": torch.randn(rows, width, generator=gen),
        "fc_weight": torch.randn(hidden, width, generator=gen) / width**0.5,
        "fc_bias": torch.randn(hidden, generator=gen) if biases else None,
        "proj_weight": torch.randn(width, hidden, generator=gen) / hidden**0.5,
        "proj_bias": torch.randn(width, generator=gen) if biases else None,
    }
    return {k: None if t is None else t.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
            for k, t in tensors.items()}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_every_size_in_float16(rows, width):
    assert_pass(gelu_mlp_checks(rows, width, 4 * width, torch.float16, device=DEVICE))


@pytest.mark.parametrize("dtype", [p for p in ALL_DTYPES if p.id != "float16"])
@pytest.mark.parametrize("rows, width", list(zip(ROWS, WIDTHS)))
def test_other_dtypes(rows, width, dtype):
    assert_pass(gelu_mlp_checks(rows, width, 4 * width, dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows, width, hidden", [(100, 48, 200), (7, 100, 130)])
def test_hidden_width_not_a_multiple_of_16(rows, width, hidden, dtype):
    assert_pass(gelu_mlp_checks(rows, width, hidden, dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("biases", [(False, False), (True, False), (False, True)], ids=["none", "fc", "proj"])
def test_without_biases(biases, dtype):
    checks = gelu_mlp_checks(33, 48, 192, dtype, biases, device=DEVICE)
    bias_grads = {name for name, on in zip(("dfc_bias", "dproj_bias"), biases) if on}
    assert {c.tensor for c in checks} == {"out", "dx", "dfc_weight", "dproj_weight"} | bias_grads
    assert_pass(checks)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("config", gm.CONFIGS, ids=CONFIG_IDS)
def test_every_config(config, dtype):
    # The interpreter cannot autotune: each config runs explicitly (block sizes change every mask).
    with every_gemm(config):
        assert_pass(gelu_mlp_checks(100, 48, 200, dtype, device=DEVICE))


@pytest.mark.parametrize("config", gm.CONFIGS, ids=CONFIG_IDS)
def test_every_config_with_many_tiles(config):
    # More than GROUP_M tile rows (several program groups, the last one partial), ragged edges
    # everywhere, and weight gradients reducing over many K steps.
    with every_gemm(config):
        assert_pass(gelu_mlp_checks(1100, 16, 72, torch.float16, device=DEVICE))


@pytest.fixture
def gpu_split(monkeypatch):
    """The split-K path a GPU takes for weight gradients over many tokens, at test sizes: a GPU of
    64 SMs, slices of one token or more (so 100 tokens of a 200 x 48 weight take 8 slices, 5 take 4)."""
    monkeypatch.setattr(gm, "sm_count", lambda device: 64)
    monkeypatch.setattr(_gemm, "SPLIT_MIN_TOKENS", 1)


def test_split_k_fills_two_waves_of_a_gpu_only_where_the_tiles_do_not():
    # GPT-2 124M's dW1 / dW2 (144 tiles of 128 x 128) on a 132-SM GPU: two slices from 8192 tokens on.
    assert [_gemm.split_k(3072, 768, tokens, 132) for tokens in (4096, 8191, 8192, 16384, 65536)] == [1, 1, 2, 2, 2]
    assert _gemm.split_k(3072, 768, 16384, None) == 1  # the interpreter
    assert _gemm.split_k(8192, 2048, 65536, 132) == 1  # 1024 tiles: enough programs already
    assert _gemm.split_k(128, 128, 10**6, 132) == _gemm.MAX_SPLIT_K  # one tile, a long reduction
    assert _gemm.split_k(256, 256, 20000, 132) == 4  # 4 tiles: slices kept at 4096 tokens or more


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("biases", [(True, True), (False, True), (False, False)], ids=["both", "proj", "none"])
@pytest.mark.parametrize("rows", [100, 5])  # 5 tokens: all in the first slice, the other three empty
def test_split_k_weight_gradients(gpu_split, rows, biases, dtype):
    assert _gemm.split_k(200, 48, rows, 64) == (8 if rows == 100 else 4)
    launched = []
    original = gm.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gm, "run", lambda plan: launched.extend(k for k, *_ in plan[1]) or original(plan))
        assert_pass(gelu_mlp_checks(rows, 48, 200, dtype, biases, device=DEVICE))
    assert launched.count(gm._gelu_mlp_bwd_split_reduce_kernel) == 2


@pytest.mark.parametrize("config", gm.SPLIT_CONFIGS, ids=[_tuning.describe(c).replace(" ", "-")
                                                            for c in gm.SPLIT_CONFIGS])
def test_every_config_with_split_k(gpu_split, config):
    # 1100 tokens in 8 slices of whole BLOCK_K steps, the last one short.
    with every_gemm(config):
        assert_pass(gelu_mlp_checks(1100, 16, 72, torch.float16, device=DEVICE))


def test_split_k_leaves_out_the_config_that_spills_there(gpu_split):
    left_out = [c for c in gm.CONFIGS if c not in gm.SPLIT_CONFIGS]
    assert len(left_out) == 1 and len(gm.SPLIT_CONFIGS) == len(gm.CONFIGS) - 1
    w = mlp_inputs(rows=100, width=48, hidden=200)
    with fastgpt_kernels.use_configs({"gelu_mlp.dweight": left_out[0]}), fastgpt_kernels.use_backend("triton"), \
            pytest.raises(ValueError, match="does not fit"):
        fastgpt_kernels.gelu_mlp(**w).sum().backward()


def test_split_k_backward_is_deterministic(gpu_split):
    """Split-K's slices are reduced in a fixed order: bit-identical gradients from two runs. In Triton's interpreter the programs run one
    after another, so this cannot fail here; on a GPU (``python -m bench.gpu_report``: its tests stage
    runs this file, its determinism stage every op at GPT-2 size) it can."""
    w = mlp_inputs(rows=64, width=48, hidden=200)
    assert_backward_deterministic(fastgpt_kernels.gelu_mlp, list(w.values()), torch.randn(64, 48, device=DEVICE))


@pytest.mark.parametrize("split", [0, -2, 1.5, True])
def test_a_bad_split_is_refused(split):
    w = mlp_inputs(rows=4, requires_grad=False)
    pre = torch.empty(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="split must be a positive int"):
        gm.backward_plan(torch.empty(4, 16, device=DEVICE), w["x"], w["fc_weight"], w["proj_weight"], pre, True,
                         True, split=split)


def test_pinned_config_must_be_one_of_the_configs():
    import triton

    with pytest.raises(ValueError, match="is not one of gelu_mlp.fwd's configs"):
        with every_gemm(triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})):
            pass
    with pytest.raises(ValueError, match="unknown kernel 'gelu_mlp.gemm'"):
        with fastgpt_kernels.use_configs({"gelu_mlp.gemm": gm.CONFIGS[0]}):
            pass


@pytest.mark.parametrize("view", ["strided", "transposed"])
def test_non_contiguous_inputs(view):
    assert_pass(gelu_mlp_checks(17, 64, 256, torch.float32, device=DEVICE, view=view))


def test_leading_dimensions_and_broadcast_output_gradient():
    w = mlp_inputs(width=16, hidden=40)
    base = torch.randn(5, 3, 16, device=DEVICE)
    x = base.transpose(0, 1).requires_grad_()  # (3, 5, 16): rows are not evenly strided
    params = [w["fc_weight"], w["fc_bias"], w["proj_weight"], w["proj_bias"]]
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.gelu_mlp(x, *params)
        got.sum().backward()  # the output gradient is a broadcast scalar: stride 0 everywhere
    grads = [t.grad for t in (x, *params)]
    results = {}
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *params)]
        out = fastgpt_kernels.reference.gelu_mlp(*leaves)
        results[dtype] = out, torch.autograd.grad(out.sum(), leaves)
    (lowp, lowp_grads), (exact, exact_grads) = results[torch.float32], results[torch.float64]
    assert got.shape == x.shape
    assert_close_to_exact(got, lowp, exact)
    for name, g, lg, eg in zip(("dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias"), grads, lowp_grads,
                               exact_grads):
        assert_close_to_exact(g, lg, eg, name)


def test_contiguous_leading_dimensions_reach_the_kernels_as_they_are():
    """A contiguous (B, T, C) input needs no (rows, C) view: the GEMMs get it with its row strides."""
    from fastgpt_kernels.ops._common import run

    w = mlp_inputs(width=16, hidden=40, requires_grad=False)
    x = torch.randn(2, 3, 16, device=DEVICE)
    params = [w["fc_weight"], w["fc_bias"], w["proj_weight"], w["proj_bias"]]
    (out, pre), launches = plan = gm.forward_plan(x, *params, keep_pre=True)
    assert launches[0][2][0] is x and out.shape == x.shape and pre.shape == (6, 40)
    run(plan)
    torch.testing.assert_close(out, fastgpt_kernels.reference.gelu_mlp(x, *params), rtol=2e-3, atol=2e-3)
    assert not any(meta["WIDE"] for *_, meta in launches)
    assert not needs_wide(torch.empty(2, 4096, 4096, device="meta"))  # rows 4096 apart, whatever the batch


@pytest.mark.skipif(DEVICE == "cuda", reason="allocates 4 GiB of storage (untouched on a CPU)")
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split-k"])
def test_offsets_past_2_31_elements_use_int64(split, request):
    """x's rows 2^30 elements apart: a tile's own offsets pass 2^31, so they are computed in int64;
    with split-K the slices' starts along the rows too, in the weight gradients' backward."""
    if split:
        request.getfixturevalue("gpu_split")
    w = mlp_inputs(rows=3, width=16, hidden=64, dtype=torch.float16, requires_grad=False)
    storage = torch.empty(2 * (2**30 + 16) + 16, dtype=torch.float16)
    x = storage.as_strided((3, 16), (2**30 + 16, 1))
    x.copy_(w["x"])
    _, launches = gm.forward_plan(x, *list(w.values())[1:], keep_pre=False)
    assert [meta["WIDE"] for *_, meta in launches] == [True, False]  # x's tiles, then the hidden layer's
    leaves = [t.requires_grad_() for t in (x, *list(w.values())[1:])]
    dout = torch.randn(3, 16, dtype=torch.float16)
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.gelu_mlp(*leaves)
        grads = torch.autograd.grad(got, leaves, dout)
    exact = [t.detach().float().requires_grad_() for t in leaves]
    expected = fastgpt_kernels.reference.gelu_mlp(*exact)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    for got_grad, want in zip(grads, torch.autograd.grad(expected, exact, dout.float())):
        torch.testing.assert_close(got_grad.float(), want, rtol=2e-2, atol=2e-2)


def test_empty_batch():
    w = mlp_inputs(rows=0)
    with fastgpt_kernels.use_backend("triton"):
        y = fastgpt_kernels.gelu_mlp(**w)
        y.sum().backward()
    assert y.shape == (0, 16)
    for name in ("fc_weight", "fc_bias", "proj_weight", "proj_bias"):
        assert torch.equal(w[name].grad, torch.zeros_like(w[name])), name


def test_backward_is_deterministic():
    """No atomics in the backward: bit-identical gradients from two runs. In Triton's interpreter the programs run one
    after another, so this cannot fail here; on a GPU (``python -m bench.gpu_report``: its tests stage
    runs this file, its determinism stage every op at GPT-2 size) it can."""
    w = mlp_inputs(rows=64, width=48, hidden=200)
    assert_backward_deterministic(fastgpt_kernels.gelu_mlp, list(w.values()), torch.randn(64, 48, device=DEVICE))


def test_the_checks_catch_the_erf_gelu(monkeypatch):
    # The exact (erf) GELU differs from the tanh form by at most ~5e-4: the checks must see it.
    def erf_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
        return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)

    monkeypatch.setattr(gm, "gelu_mlp", erf_gelu_mlp)
    checks = gelu_mlp_checks(7, 48, 192, torch.float32, device=DEVICE)
    assert not next(c for c in checks if c.tensor == "out").passed


MLP_GRADIENTS = ("dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias")
MLP_MUTANTS = output_mutants(MLP_GRADIENTS)


def mlp_names(plan):
    return ("out", "pre") if len(plan[0]) == 2 else MLP_GRADIENTS


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mutant", MLP_MUTANTS)
def test_verify_fails_a_wrong_output_or_gradient(monkeypatch, dtype, mutant):
    """The kernels' results made wrong after their launches, at the suite's largest shape: every
    mutant must fail verify's bound for its tensor, and only that one."""
    tensor, factor = MLP_MUTANTS[mutant]
    scale_after_launch(monkeypatch, gm, mlp_names, tensor, factor)
    checks = {c.tensor: c for c in gelu_mlp_checks(257, 128, 512, dtype, device=DEVICE)}
    assert not checks[tensor].passed, f"verify passed {mutant}: {checks[tensor]}"
    assert all(c.passed for name, c in checks.items() if name != tensor)


def mlp_without_the_tanh_derivative(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """The MLP whose backward drops GELU's tanh-derivative term: gelu'(z) = (1 + tanh(u)) / 2 only
    (the tanh held constant). The forward is exact."""
    pre = F.linear(x.float(), fc_weight.float(), fc_bias.float())
    u = (2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre**3)
    act = 0.5 * pre * (1 + torch.tanh(u)).detach()
    return F.linear(act, proj_weight.float(), proj_bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_verify_fails_a_backward_without_the_tanh_derivative(monkeypatch, dtype):
    monkeypatch.setattr(gm, "gelu_mlp", mlp_without_the_tanh_derivative)
    checks = {c.tensor: c for c in gelu_mlp_checks(257, 128, 512, dtype, device=DEVICE)}
    assert not any(checks[t].passed for t in ("dx", "dfc_weight", "dfc_bias")), [str(c) for c in checks.values()]
    assert checks["dproj_weight"].passed and checks["dproj_bias"].passed


@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="bytes are counted in Triton's interpreter")
class TestMemoryTraffic:
    """Interpreter byte counts: a model of memory traffic, not GPU measurements."""

    M, C, H = 256, 128, 512  # float16

    def traffic(self, **w):
        from fastgpt_kernels.tools.traffic import count_memory_traffic

        with fastgpt_kernels.use_backend("triton"), count_memory_traffic() as traffic:
            fastgpt_kernels.gelu_mlp(**w)
        assert traffic.out_of_bounds == 0  # every active lane inside a tensor argument
        return traffic

    def test_fused_forward_moves_fewer_bytes_than_the_unfused_ops(self):
        from fastgpt_kernels.tools.traffic import count_torch_traffic

        w = mlp_inputs(self.M, self.C, self.H, torch.float16)
        fused = self.traffic(**w)  # a training forward: pre is kept for the backward
        x, w1, b1, w2, b2 = (t.detach() for t in w.values())
        with count_torch_traffic() as unfused:  # linear, add, gelu as separate passes
            h = x @ w1.t()
            a = F.gelu(h + b1, approximate="tanh")
            (a @ w2.t()) + b2
        fused_distinct = fused.distinct_loaded + fused.distinct_stored
        unfused_total = unfused.loaded + unfused.stored
        print(f"\ngelu_mlp forward, M={self.M} C={self.C} H={self.H} float16, interpreter counts "
              f"(a model, not GPU measurements; config {_tuning.describe(gm.CONFIGS[0])}):\n"
              f"  fused kernels: {fused.loaded + fused.stored} B requested by active lanes "
              f"({fused.loaded} loaded, {fused.stored} stored), {fused_distinct} B distinct\n"
              f"  unfused ops (each reads its inputs and writes its outputs once): {unfused_total} B "
              f"({unfused.loaded} loaded, {unfused.stored} stored)")
        assert fused_distinct < unfused_total

    def test_forward_writes_act_and_out_plus_pre_only_for_the_backward(self):
        w = mlp_inputs(self.M, self.C, self.H, torch.float16)
        act_out = (self.M * self.H + self.M * self.C) * 2
        assert self.traffic(**w).stored == act_out + self.M * self.H * 2
        with torch.no_grad():
            assert self.traffic(**w).stored == act_out


@pytest.mark.parametrize("backend", ["triton", "torch"])
class TestBadInput:
    def test_x_width_does_not_match_fc_weight(self, backend):
        w = mlp_inputs(width=16)
        w["x"] = torch.randn(3, 12, device=DEVICE)
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"fc_weight must have shape \(hidden, C\) "
                                                                           r"with C = x.shape\[-1\] = 12"):
            fastgpt_kernels.gelu_mlp(**w)

    def test_proj_weight_shape(self, backend):
        w = {**mlp_inputs(width=16, hidden=64), "proj_weight": torch.randn(16, 63, device=DEVICE)}
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"proj_weight must have shape \(16, 64\)"):
            fastgpt_kernels.gelu_mlp(**w)

    def test_bias_shape(self, backend):
        w = {**mlp_inputs(hidden=64), "fc_bias": torch.randn(16, device=DEVICE)}
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"fc_bias must have shape \(64,\)"):
            fastgpt_kernels.gelu_mlp(**w)

    def test_dtype_mismatch(self, backend):
        w = mlp_inputs()
        w["proj_weight"] = w["proj_weight"].detach().half()
        with fastgpt_kernels.use_backend(backend), pytest.raises(
                TypeError, match="proj_weight has dtype torch.float16 but x has dtype torch.float32"):
            fastgpt_kernels.gelu_mlp(**w)

    def test_device_mismatch(self, backend):
        w = mlp_inputs()
        w["fc_bias"] = w["fc_bias"].detach().to("meta")
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=f"fc_bias is on meta but x is on {DEVICE}"):
            fastgpt_kernels.gelu_mlp(**w)


def test_float64_falls_back_under_auto_and_is_refused_under_triton():
    w = mlp_inputs(dtype=torch.float64, requires_grad=False)
    with fastgpt_kernels.use_backend("auto"):
        torch.testing.assert_close(fastgpt_kernels.gelu_mlp(**w), fastgpt_kernels.reference.gelu_mlp(**w))
    with fastgpt_kernels.use_backend("triton"), pytest.raises(fastgpt_kernels.KernelUnavailableError,
                                                      match="fastgpt_kernels.gelu_mlp: .*x has dtype torch.float64"):
        fastgpt_kernels.gelu_mlp(**w)


def test_empty_widths_fall_back_under_auto_and_are_refused_under_triton():
    w = mlp_inputs(width=16, hidden=0, requires_grad=False)
    with fastgpt_kernels.use_backend("auto"):
        torch.testing.assert_close(fastgpt_kernels.gelu_mlp(**w), w["proj_bias"].expand(5, 16))
    with fastgpt_kernels.use_backend("triton"), pytest.raises(fastgpt_kernels.KernelUnavailableError, match=r"fc_weight has shape \(0, 16\)"):
        fastgpt_kernels.gelu_mlp(**w)


def test_torch_compile_keeps_the_kernels_in_one_graph():
    w = mlp_inputs(width=32, hidden=128)
    params = [w["fc_weight"], w["fc_bias"], w["proj_weight"], w["proj_bias"]]

    def block(x):
        return fastgpt_kernels.gelu_mlp(torch.tanh(x), *params) * 2

    compiled = torch.compile(block, fullgraph=True)  # fails on any graph break
    x = torch.randn(2, 3, 32, device=DEVICE, requires_grad=True)
    with fastgpt_kernels.use_backend("triton"):
        got = compiled(x)
        got.sum().backward()
    grads = [t.grad for t in (x, *params)]
    for t in (x, *params):
        t.grad = None
    with fastgpt_kernels.use_backend("torch"):
        expected = block(x)
        expected.sum().backward()
    torch.testing.assert_close(got, expected, **float32_tolerance())
    for g, t in zip(grads, (x, *params)):
        torch.testing.assert_close(g, t.grad, **float32_tolerance())
