"""fastgpt_kernels.linear_cross_entropy: the fused lm_head + loss, Triton kernels and the chunked PyTorch fallback,
against the unfused ``F.cross_entropy(F.linear(...).float())`` in float64 by the 2x-PyTorch rule
(see fastgpt_kernels.tools.verify); chunks, configs, int64 offsets, memory, bad input, autocast, torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt_kernels
from conftest import GRADIENT_FACTORS, ALL_DTYPES, DEVICE, assert_backward_deterministic, dtype_param
from fastgpt_kernels import _dispatch, reference
from fastgpt_kernels.ops import linear_cross_entropy as lce
from fastgpt_kernels.registry.linear_cross_entropy import checks as linear_cross_entropy_checks
from fastgpt_kernels.tools.checking import assert_pass

FP16 = torch.float16
KERNELS = ("linear_cross_entropy.logits", "linear_cross_entropy.dx", "linear_cross_entropy.dweight")


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", ALL_DTYPES)
# V=1 is degenerate (the loss and every gradient are 0 exactly); V=2 is its partner.
@pytest.mark.parametrize("rows, width, vocab", [(1, 16, 17), (7, 100, 1), (7, 100, 2), (300, 100, 1000),
                                                (7, 768, 17), (300, 16, 1000)])
def test_forward_and_gradients(rows, width, vocab, dtype):
    assert_pass(linear_cross_entropy_checks(rows, width, vocab, dtype, device=DEVICE))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [dtype_param(FP16), dtype_param(torch.bfloat16)])
def test_gpt2_vocabulary(dtype):
    assert_pass(linear_cross_entropy_checks(7, 16, 50257, dtype, device=DEVICE))


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_reduction_with_some_all_or_no_targets_ignored(reduction, ignored, bias):
    checks = linear_cross_entropy_checks(33, 48, 300, FP16, bias, ignored, reduction, device=DEVICE)
    assert {c.tensor for c in checks} == {"out", "dx", "dweight"} | ({"dbias"} if bias else set())
    assert_pass(checks)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_strided_x_and_a_column_major_weight(dtype):
    assert_pass(linear_cross_entropy_checks(17, 64, 100, dtype, view="strided", device=DEVICE))


@pytest.mark.parametrize("config", lce.CONFIGS, ids=lambda c: fastgpt_kernels._tuning.describe(c).replace(" ", "-"))
def test_every_config(config):
    # Ragged rows, widths and vocabulary in every tiling; dweight reduces over several K steps.
    pins = dict.fromkeys(KERNELS, config)
    if config not in lce.DWEIGHT_CONFIGS:  # left out of the weight gradient's configs (it spills there)
        pins["linear_cross_entropy.dweight"] = lce.DWEIGHT_CONFIGS[0]
    with fastgpt_kernels.use_configs(pins):
        assert_pass(linear_cross_entropy_checks(100, 48, 300, FP16, device=DEVICE))


@pytest.mark.parametrize("fallback", [False, True], ids=["kernels", "fallback"])
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_several_chunks_give_the_unfused_function(monkeypatch, fallback, reduction):
    """Chunks of 7 rows, the last one ragged: the rows of x and dx, and the sums of dweight and
    dbias across chunks, in the kernels and in the chunked PyTorch fallback."""
    monkeypatch.setattr(reference, "MAX_CHUNK_LOGITS", 7 * 300)
    assert reference.chunk_rows(40, 300) == 7
    assert_pass(linear_cross_entropy_checks(40, 48, 300, FP16, reduction=reduction, fallback=fallback,
                                            device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows, width, vocab", [(1, 16, 17), (300, 100, 1000), (7, 16, 50257)])
def test_the_chunked_fallback_by_the_same_rule(monkeypatch, rows, width, vocab, dtype):
    """The PyTorch fallback runs on every machine without the kernels: it meets the same bound."""
    monkeypatch.setattr(reference, "MAX_CHUNK_LOGITS", 9 * vocab)
    assert_pass(linear_cross_entropy_checks(rows, width, vocab, dtype, fallback=True, device=DEVICE))


def test_backward_is_deterministic():
    """No atomics in the backward: bit-identical gradients from two runs. In Triton's interpreter the programs run one
    after another, so this cannot fail here; on a GPU (``python -m bench.gpu_report``: its tests stage
    runs this file, its determinism stage every op at GPT-2 size) it can."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 48, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(300, 48, generator=gen).to(DEVICE).requires_grad_()
    bias = torch.randn(300, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(300, (70,), generator=gen).to(DEVICE)
    assert_backward_deterministic(lambda x, w, b: fastgpt_kernels.linear_cross_entropy(x, w, targets, b, reduction="none"),
                                  (x, weight, bias), torch.randn(70, device=DEVICE))


def test_leading_dimensions_and_empty_rows():
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(17, 16, device=DEVICE, requires_grad=True)
    targets = torch.randint(17, (2, 3), device=DEVICE)
    with fastgpt_kernels.use_backend("triton"):
        per_position = fastgpt_kernels.linear_cross_entropy(x, weight, targets, reduction="none")
        empty = fastgpt_kernels.linear_cross_entropy(x[:, :0], weight, targets[:, :0], reduction="sum")
    assert per_position.shape == (2, 3) and per_position.dtype == torch.float32
    expected = F.cross_entropy(F.linear(x, weight).float().flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(per_position, expected.view(2, 3), rtol=1e-4, atol=1e-4)
    assert empty.item() == 0.0


# --------------------------------------------------------------------------- float16 under a loss scale


def _scaled_gradients(loss_fn, x, weight, bias, targets, reduction, loss_scale):
    """The gradients of ``loss_fn(...) * loss_scale`` for x, weight and bias, as GradScaler makes them."""
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
    loss = loss_fn(*inputs, targets, reduction=reduction)
    (loss * loss_scale).backward()
    return [t.grad for t in inputs]


def _public_order(x, weight, bias, targets, reduction):
    return fastgpt_kernels.linear_cross_entropy(x, weight, targets, bias, reduction=reduction)


def _relative_errors(grads, exact):
    """Each gradient's error relative to the exact one's size (Frobenius norms): a flushed entry counts
    with its weight in the gradient, not only the largest entry."""
    return [((g.double() - e).norm() / e.norm()).item() for g, e in zip(grads, exact)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction, loss_scale", [("mean", 1024.0), ("mean", 65536.0), ("sum", 1024.0)])
def test_float16_gradients_under_a_loss_scale_match_the_unfused_loss(backend, reduction, loss_scale):
    # Many rows: most probabilities times 1 / n_valid lie below float16's smallest subnormal (6e-8),
    # where a gradient formed before the scale reaches it is flushed to zero (2.3x to 3.5x the unfused
    # loss's error here before the fix). The unfused loss forms the logits' gradient with the scale
    # already in it; the fused one must be as close.
    gen = torch.Generator().manual_seed(0)
    n, c, v = 2048, 32, 512
    x = torch.randn(n, c, generator=gen).to(DEVICE)
    weight = (torch.randn(v, c, generator=gen) * 0.3).to(DEVICE)
    bias = (torch.randn(v, generator=gen) * 0.1).to(DEVICE)
    targets = torch.randint(v, (n,), generator=gen).to(DEVICE)
    exact = [g * loss_scale for g in _scaled_gradients(reference.linear_cross_entropy_unfused, x.double(),
                                                       weight.double(), bias.double(), targets, reduction, 1.0)]
    half = [t.half() for t in (x, weight, bias)]
    unfused = _scaled_gradients(reference.linear_cross_entropy_unfused, *half, targets, reduction, loss_scale)
    with fastgpt_kernels.use_backend(backend):
        fused = _scaled_gradients(_public_order, *half, targets, reduction, loss_scale)
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in fused)
    for name, got, allowed in zip(("dx", "dweight", "dbias"), _relative_errors(fused, exact),
                                  _relative_errors(unfused, exact)):
        assert got <= 2 * allowed, f"{name}: relative error {got:.2e}, the unfused loss's {allowed:.2e}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_loss_scale_is_applied_in_float32(backend):
    # GradScaler's default scale, 65536, is inf in float16: a reduced loss's gradients stay finite.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen).half().to(DEVICE).requires_grad_()
    weight = torch.randn(40, 16, generator=gen).half().to(DEVICE).requires_grad_()
    targets = torch.randint(40, (64,), generator=gen).to(DEVICE)
    with fastgpt_kernels.use_backend(backend):
        loss = fastgpt_kernels.linear_cross_entropy(x, weight, targets, reduction="mean")
    (loss * 65536.0).backward()
    expected = torch.autograd.grad(reference.linear_cross_entropy_unfused(x.float(), weight.float(), None, targets)
                                   * 65536.0, (x, weight))
    for got, want in zip((x.grad, weight.grad), expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


# --------------------------------------------------------------------------- int64 offsets


def _strided_view(rows: int, cols: int, row_stride: int, dtype, values: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) view whose row r starts ``r * row_stride`` elements into a storage that is
    mostly never touched (the pages stay unmapped): offsets past 2^31 at little real memory."""
    storage = torch.empty((rows - 1) * row_stride + cols, dtype=dtype, device=DEVICE)
    view = storage.as_strided((rows, cols), (row_stride, 1))
    view.copy_(values)
    return view


@pytest.mark.skipif(DEVICE == "cuda", reason="allocates 4 GiB of storage (untouched on a CPU)")
def test_offsets_past_2_31_elements_use_int64():
    """x's rows and weight's rows far apart: their offsets pass 2^31 in the forward and in the
    backward's dx and dweight GEMMs."""
    gen = torch.Generator().manual_seed(0)
    x_values, w_values = torch.randn(3, 16, generator=gen), torch.randn(17, 16, generator=gen) / 4
    targets = torch.tensor([4, 16, 0])
    x = _strided_view(3, 16, 2**30 + 16, FP16, x_values)  # row 2 starts 2^31 + 32 elements in
    weight = _strided_view(17, 16, 2**27, FP16, w_values)  # row 16 starts 2^31 elements in
    assert x.storage_offset() == 0 and 2 * x.stride(0) >= 2**31 and 16 * weight.stride(0) >= 2**31
    dloss = torch.randn(3, generator=gen)
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.linear_cross_entropy(x.requires_grad_(), weight.requires_grad_(), targets,
                                                   reduction="none")
        grads = torch.autograd.grad(got, (x, weight), dloss)
    exact = [t.half().double().requires_grad_() for t in (x_values, w_values)]
    expected = F.cross_entropy(F.linear(*exact), targets, reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)
    for name, g, w in zip(("dx", "dweight"), grads, torch.autograd.grad(expected, exact, dloss.double())):
        torch.testing.assert_close(g.double(), w, rtol=5e-3, atol=5e-3 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any tensor created by an aten op had (views and in-place ops, such
    as the interpreter's copies of kernel arguments, create none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.__name__.split(".")[0].endswith("_"):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_never_more_than_a_chunk_of_logits_exists(monkeypatch, backend):
    monkeypatch.setattr(reference, "MAX_CHUNK_LOGITS", 16 * 1000)
    rows, width, vocab = 200, 32, 1000
    x = torch.randn(rows, width, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, width, device=DEVICE, requires_grad=True)
    targets = torch.randint(vocab, (rows,), device=DEVICE)
    with fastgpt_kernels.use_backend(backend), _LargestTensor() as seen:
        loss = fastgpt_kernels.linear_cross_entropy(x, weight, targets)
        loss.backward()
    assert seen.largest <= max(16 * 1000, vocab * width)  # never (rows, V) = 200 000
    with _LargestTensor() as unfused:
        reference.linear_cross_entropy_unfused(x, weight, None, targets).backward()
    assert unfused.largest == rows * vocab


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_loss_without_gradients_makes_none(monkeypatch, backend):
    """Under no_grad (evaluation) the reduced loss does not precompute a weight gradient, even for
    a weight that requires one."""
    monkeypatch.setattr(reference, "MAX_CHUNK_LOGITS", 16 * 1000)
    rows, width, vocab = 200, 32, 1000
    x = torch.randn(rows, width, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, width, device=DEVICE, requires_grad=True)
    targets = torch.randint(vocab, (rows,), device=DEVICE)
    with fastgpt_kernels.use_backend(backend), torch.no_grad(), _LargestTensor() as seen:
        loss = fastgpt_kernels.linear_cross_entropy(x, weight, targets)
    assert seen.largest < vocab * width
    assert not loss.requires_grad


@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts bytes in Triton's interpreter")
def test_memory_traffic_against_the_unfused_ops(capsys):
    """Interpreter byte counts (a model of traffic, not a GPU measurement), forward + backward."""
    from fastgpt_kernels.tools.traffic import count_memory_traffic, count_torch_traffic

    rows, width, vocab = 256, 128, 2048
    gen = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(*s, generator=gen).half().requires_grad_() for s in ((rows, width), (vocab, width)))
    targets = torch.randint(vocab, (rows,), generator=gen)
    with fastgpt_kernels.use_backend("triton"), count_memory_traffic() as fused:
        fastgpt_kernels.linear_cross_entropy(x, weight, targets).backward()
    with count_torch_traffic() as unfused:
        reference.linear_cross_entropy_unfused(x, weight, None, targets).backward()
    assert fused.out_of_bounds == 0 and fused.reads_after_writes == 0
    fused_bytes = fused.distinct_loaded + fused.distinct_stored
    with capsys.disabled():
        print(f"\nlinear_cross_entropy forward+backward N={rows} C={width} V={vocab} float16, interpreter counts "
              f"(a model, not GPU measurements): fused kernels {fused_bytes / 1e6:.2f} MB distinct "
              f"({(fused.loaded + fused.stored) / 1e6:.2f} MB requested); unfused PyTorch ops "
              f"{(unfused.loaded + unfused.stored) / 1e6:.2f} MB")
    assert fused_bytes < (unfused.loaded + unfused.stored) / 2


# --------------------------------------------------------------------------- bad input and dispatch


def _inputs(rows=5, width=16, vocab=17, dtype=torch.float32):
    return (torch.randn(rows, width, device=DEVICE, dtype=dtype), torch.randn(vocab, width, device=DEVICE, dtype=dtype),
            torch.randint(vocab, (rows,), device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
class TestBadInput:
    def test_weight_width(self, backend):
        x, weight, targets = _inputs()
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"weight must have shape \(V, C\) with C = "
                                                                            r"x.shape\[-1\] = 16, got \(17, 15\)"):
            fastgpt_kernels.linear_cross_entropy(x, weight[:, :15], targets)

    def test_bias_shape(self, backend):
        x, weight, targets = _inputs()
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"bias must have shape \(17,\)"):
            fastgpt_kernels.linear_cross_entropy(x, weight, targets, torch.zeros(16, device=DEVICE))

    def test_targets_shape_and_dtype(self, backend):
        x, weight, targets = _inputs()
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"targets must have shape \(5,\)"):
            fastgpt_kernels.linear_cross_entropy(x, weight, targets[:4])
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="targets must be an int64 tensor"):
            fastgpt_kernels.linear_cross_entropy(x, weight, targets.int())

    def test_target_out_of_range_is_named_with_its_position(self, backend):
        x, weight, targets = _inputs()
        targets = targets.cpu().clone()
        targets[3] = 17
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"targets\[3\] = 17 is not a class index "
                                                                           r"in \[0, 17\) nor ignore_index \(-100\)"):
            fastgpt_kernels.linear_cross_entropy(x.cpu(), weight.cpu(), targets)

    def test_dtype_and_device_mismatch(self, backend):
        x, weight, targets = _inputs()
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="weight has dtype torch.float16 but x has"):
            fastgpt_kernels.linear_cross_entropy(x, weight.half(), targets)
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match="targets is on meta but x is on"):
            fastgpt_kernels.linear_cross_entropy(x, weight, targets.to("meta"))

    def test_unknown_reduction_and_bad_ignore_index(self, backend):
        x, weight, targets = _inputs()
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', "
                                                                           "'none', got 'avg'"):
            fastgpt_kernels.linear_cross_entropy(x, weight, targets, reduction="avg")
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="ignore_index must be an integer, got float"):
            fastgpt_kernels.linear_cross_entropy(x, weight, targets, ignore_index=-1.0)


def test_float64_falls_back_under_auto_and_is_refused_under_triton():
    x, weight, targets = (t.double() if t.is_floating_point() else t for t in _inputs())
    with fastgpt_kernels.use_backend("auto"):
        got = fastgpt_kernels.linear_cross_entropy(x, weight, targets)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x, weight), targets))
    assert got.dtype == torch.float64
    with fastgpt_kernels.use_backend("triton"), pytest.raises(fastgpt_kernels.KernelUnavailableError, match="x has dtype torch.float64"):
        fastgpt_kernels.linear_cross_entropy(x, weight, targets)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_the_inputs_as_f_linear_does(backend):
    from conftest import BF16_SKIP_REASON

    if backend == "triton" and BF16_SKIP_REASON:
        pytest.skip(BF16_SKIP_REASON)
    x, weight, targets = _inputs(rows=9, width=32, vocab=40)
    x.requires_grad_()
    weight.requires_grad_()
    with fastgpt_kernels.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fastgpt_kernels.linear_cross_entropy(x, weight, targets)
        expected = F.cross_entropy(F.linear(x, weight).float(), targets)  # F.linear casts to bfloat16
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(loss * 3.0, (x, weight))
    want = torch.autograd.grad(expected * 3.0, (x, weight))
    for name, g, w in zip(("dx", "dweight"), got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_torch_compile_keeps_the_kernels_in_one_graph():
    x, weight, targets = _inputs(rows=6, width=16, vocab=33)
    weight.requires_grad_()

    def head(h):
        return fastgpt_kernels.linear_cross_entropy(torch.tanh(h), weight, targets) * 2

    compiled = torch.compile(head, fullgraph=True)  # fails on any graph break
    h = x.clone().requires_grad_()
    with fastgpt_kernels.use_backend("triton"):
        got = compiled(h)
        got.backward()
    grads = h.grad, weight.grad
    h.grad = weight.grad = None
    with fastgpt_kernels.use_backend("torch"):
        expected = head(h)
        expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, (h.grad, weight.grad)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- verify catches a wrong loss


TENSORS = ("dx", "dweight", "dbias")
MUTANTS = {f"{t} {label}": (i, f) for i, t in enumerate(TENSORS) for label, f in GRADIENT_FACTORS.items()}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("mutant", [*MUTANTS, "loss x1.01"])
def test_verify_fails_a_wrong_gradient_or_loss(monkeypatch, dtype, reduction, mutant):
    """Wrong results fed through the kernels' own path at the suite's largest loss shape: every
    mutant must fail verify's bound for its tensor (a bound that admits one checks nothing)."""
    if mutant == "loss x1.01":
        forward = reference.linear_cross_entropy_forward

        def wrong_forward(*args, **kwargs):
            loss, lse, grads = forward(*args, **kwargs)
            return loss * 1.01, lse, grads

        monkeypatch.setattr(reference, "linear_cross_entropy_forward", wrong_forward)
        tensor = "out"
    else:
        index, factor = MUTANTS[mutant]
        tensor = TENSORS[index]

        def wrong(gradients):
            def call(*args, **kwargs):
                grads = list(gradients(*args, **kwargs))
                grads[index] = grads[index] * factor
                return tuple(grads)
            return call

        # A reduced loss's gradients leave through scale_gradients, reduction "none"'s through
        # linear_cross_entropy_gradients: on both backends.
        monkeypatch.setattr(reference, "scale_gradients", wrong(reference.scale_gradients))
        monkeypatch.setattr(reference, "linear_cross_entropy_gradients",
                            wrong(reference.linear_cross_entropy_gradients))
    checks = {c.tensor: c for c in linear_cross_entropy_checks(300, 16, 1000, dtype, reduction=reduction,
                                                               device=DEVICE)}
    assert not checks[tensor].passed, f"verify passed {mutant}: {checks[tensor]}"
    assert all(c.passed for name, c in checks.items() if name != tensor)


def loss_without_the_softmax_term(x, weight, bias, targets, ignore_index, reduction):
    """The loss whose backward drops the softmax term of dlogits = softmax - onehot(target) (the
    log-sum-exp held constant). The loss itself is exact."""
    logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    valid = targets != ignore_index
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    losses = torch.where(valid, torch.logsumexp(logits, -1).detach() - picked, 0.0)
    return {"none": losses, "sum": losses.sum(), "mean": losses.sum() / valid.sum()}[reduction]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_verify_fails_a_backward_without_the_softmax_term(monkeypatch, dtype, reduction):
    monkeypatch.setattr(lce, "linear_cross_entropy", loss_without_the_softmax_term)
    checks = {c.tensor: c for c in linear_cross_entropy_checks(300, 16, 1000, dtype, reduction=reduction,
                                                               device=DEVICE)}
    assert not any(checks[t].passed for t in TENSORS), [str(checks[t]) for t in TENSORS]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_gradients_of_a_reduced_loss_stay_float64(reduction):
    # The fallback takes float64; its output gradient is applied in float64, not float32.
    gen = torch.Generator().manual_seed(2)
    x, weight, bias = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
                       for shape in ((40, 8), (30, 8), (30,)))
    targets = torch.randint(30, (40,), generator=gen)
    got = torch.autograd.grad(fastgpt_kernels.linear_cross_entropy(x, weight, targets, bias, reduction=reduction) * 3.7,
                              (x, weight, bias))
    want = torch.autograd.grad(reference.linear_cross_entropy_unfused(x, weight, bias, targets, reduction=reduction)
                               * 3.7, (x, weight, bias))
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
