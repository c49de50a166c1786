"""fastgpt_kernels.attention: the Triton flash-attention kernels against float64 by the 2x-PyTorch rule
(see fastgpt_kernels.tools.verify), dropout, memory traffic, bad input and torch.compile."""
import math

import numpy as np
import pytest
import torch

import fastgpt_kernels
from conftest import (ALL_DTYPES, DEVICE, assert_backward_deterministic, float32_tolerance, output_mutants,
                      scale_after_launch)
from fastgpt_kernels import _dispatch, reference
from fastgpt_kernels.ops import attention as attn
from fastgpt_kernels.tools import traffic
from fastgpt_kernels.tools.dropout import dropout_mask
from fastgpt_kernels.registry.attention import checks as attention_checks
from fastgpt_kernels.tools.checking import assert_close_to_exact, assert_pass

FP16 = torch.float16


def qkv(B=1, H=2, T=17, D=16, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
                 for _ in range(3))


# --------------------------------------------------------------------------- numerics


# Causal T=1 is degenerate (out = v, dq = dk = 0 exactly); T=2 is its partner.
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [1, 2, 17, 64, 100, 257])
def test_every_length(T, causal):
    assert_pass(attention_checks(1, 2, T, 64, FP16, causal, device=DEVICE))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T, keys", [(1, 1), (1, 17), (1, 100), (5, 64), (37, 100), (64, 257), (100, 101)])
def test_fewer_queries_than_keys(T, keys, causal):
    """The queries are the last T of ``keys`` positions (new tokens against a cache of keys and values):
    causal masking is aligned at the bottom right, forward and backward."""
    assert_pass(attention_checks(1, 2, T, 64, FP16, causal, keys=keys, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fewer_queries_than_keys_in_every_dtype_with_dropout(dtype):
    assert_pass(attention_checks(2, 2, 17, 32, dtype, keys=70, dropout_p=0.2, device=DEVICE))


@pytest.mark.parametrize("D", [8, 16, 32, 48, 80, 96, 128])
def test_every_head_dim(D):
    assert_pass(attention_checks(1, 2, 100, D, FP16, device=DEVICE))


@pytest.mark.parametrize("D", [16, 48, 128])
def test_head_dims_on_a_short_sequence(D):
    assert_pass(attention_checks(2, 1, 17, D, FP16, causal=False, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B, H, T, D, causal", [(1, 2, 100, 64, True), (1, 1, 257, 48, False), (3, 1, 17, 16, True)])
def test_every_dtype(B, H, T, D, causal, dtype):
    assert_pass(attention_checks(B, H, T, D, dtype, causal, device=DEVICE))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T, softmax_scale", [(17, None), (100, 0.3)])
def test_slices_of_a_fused_qkv_tensor(T, softmax_scale, causal, dtype):
    checks = attention_checks(2, 2, T, 32, dtype, causal, softmax_scale=softmax_scale, layout="qkv", device=DEVICE)
    assert {c.tensor for c in checks} == {"out", "dqkv"}
    assert_pass(checks)


def test_softmax_scale_given_and_default():
    q, k, v = qkv(T=33, D=16)
    with fastgpt_kernels.use_backend("triton"):
        default = fastgpt_kernels.attention(q, k, v)
        explicit = fastgpt_kernels.attention(q, k, v, softmax_scale=0.25)
        other = fastgpt_kernels.attention(q, k, v, softmax_scale=0.7)
    assert torch.equal(default, explicit)
    expected = reference.attention_math(q.double(), k.double(), v.double(), True, 0.7)
    assert_close_to_exact(other, reference.attention_math(q, k, v, True, 0.7), expected)


ALL_TILES = [pytest.param(kind, tile, id=f"{kind}-{tile.config.kwargs['BLOCK_M']}x{tile.config.kwargs['BLOCK_N']}"
                          f"-w{tile.config.num_warps}")
             for kind in attn.KINDS for tile in attn.TILES[kind]]


@pytest.mark.parametrize("kind, tile", ALL_TILES)
def test_every_config(kind, tile):
    # T = 100 is ragged for every tile size; dropout exercises the mask's key groups in each tiling,
    # at the largest head dimension the config takes with dropout.
    with fastgpt_kernels.use_configs({f"attention.{kind}": tile.config}):
        D = min(64, attn.max_block_d(tile, FP16, dropout=True))
        assert_pass(attention_checks(1, 2, 100, D, FP16, dropout_p=0.2, device=DEVICE))
        assert_pass(attention_checks(1, 1, 100, 32, FP16, causal=False, device=DEVICE))
        assert_pass(attention_checks(1, 1, 70, 32, FP16, keys=130, device=DEVICE))


def test_configs_cover_the_autotuner_and_are_pruned_by_head_dim_and_dropout():
    for kind, tuned in (("fwd", attn._attention_fwd), ("dkdv", attn._attention_bwd_dkdv), ("dq", attn._attention_bwd_dq)):
        assert list(tuned.configs) == [tile.config for tile in attn.TILES[kind]] == tuned.tuner.configs
        for D in (8, 16, 48, 64, 80, 128):
            for dtype in (FP16, torch.bfloat16) + ((torch.float32,) if D <= 64 else ()):
                for dropout in (False, True):
                    allowed = attn.configs(kind, D, dtype, 4096, dropout)
                    assert allowed, (kind, D, dtype, dropout)
                    for tile in attn.TILES[kind]:
                        limit = tile.max_d_fp32 if dtype == torch.float32 else tile.max_d
                        if dropout:
                            limit = min(limit, tile.max_d_dropout)
                            if dtype == torch.float32 and tile.max_d_dropout_fp32 is not None:
                                limit = min(limit, tile.max_d_dropout_fp32)
                        assert (tile.config in allowed) == (attn.block_d(D) <= limit), (kind, D, dtype, tile)
        # Short sequences keep only tiles of up to 64 (one config at least).
        assert all(max(c.kwargs.values()) <= 64 for c in attn.configs(kind, 64, FP16, 17, False))


def test_a_pruned_config_cannot_be_forced():
    big = next(tile.config for tile in attn.TILES["dkdv"] if tile.max_d < 128)
    q, k, v = qkv(T=17, D=128, dtype=FP16, requires_grad=True)
    with fastgpt_kernels.use_configs({"attention.dkdv": big}), fastgpt_kernels.use_backend("triton"), \
            pytest.raises(ValueError, match="does not fit"):
        fastgpt_kernels.attention(q, k, v).sum().backward()
    narrower_with_dropout = next(tile for tile in attn.TILES["fwd"] if tile.max_d_dropout < tile.max_d)
    q, k, v = qkv(T=17, D=narrower_with_dropout.max_d, dtype=FP16)
    with fastgpt_kernels.use_configs({"attention.fwd": narrower_with_dropout.config}), fastgpt_kernels.use_backend("triton"), \
            pytest.raises(ValueError, match="does not fit"):
        fastgpt_kernels.attention(q, k, v, dropout_p=0.1)


def test_backward_is_deterministic():
    """No atomics in the backward: bit-identical gradients from two runs. In Triton's interpreter the programs run one
    after another, so this cannot fail here; on a GPU (``python -m bench.gpu_report``: its tests stage
    runs this file, its determinism stage every op at GPT-2 size) it can."""
    q, k, v = qkv(T=100, D=32, requires_grad=True)
    assert_backward_deterministic(fastgpt_kernels.attention, (q, k, v), torch.randn(q.shape, device=DEVICE))


def test_arbitrary_strides():
    # Heads interleaved with time, every other element of the head dimension, and a stride-0 batch.
    base = torch.randn(1, 40, 3, 64, device=DEVICE)
    q = base[:, :, 0, ::2].unsqueeze(1).expand(2, 2, 40, 32)
    k = base[:, :, 1, ::2].unsqueeze(1).expand(2, 2, 40, 32)
    v = base[:, :, 2, 1::2].unsqueeze(1).expand(2, 2, 40, 32)
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.attention(q, k, v, causal=False)
    expected = reference.attention_math(q.double(), k.double(), v.double(), False)
    assert_close_to_exact(got, reference.attention(q, k, v, False), expected)


@pytest.mark.skipif(DEVICE == "cuda", reason="allocates 4 GiB of storage (untouched on a CPU)")
def test_heads_past_2_31_elements_forward_and_backward():
    """q, k, v and the output gradient with batches 2^30 + 64 elements apart: batch 2's heads start
    past 2^31, so the head offsets are int64, in the forward and in every backward kernel."""
    B, H, T, D = 3, 2, 17, 16
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(B, H, T, D, generator=gen).half() for _ in range(4)]

    def far_apart(v):
        storage = torch.empty(2 * (2**30 + 64) + H * T * D, dtype=torch.float16)
        view = storage.as_strided((B, H, T, D), (2**30 + 64, T * D, D, 1))
        view.copy_(v)
        return view

    q, k, v, dout = (far_apart(t) for t in values)
    assert (B - 1) * q.stride(0) >= 2**31
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with fastgpt_kernels.use_backend("triton"):
        got = fastgpt_kernels.attention(*leaves)
        grads = torch.autograd.grad(got, leaves, dout)
    exact = [t.double().requires_grad_() for t in values[:3]]
    want = reference.attention_math(*exact)
    wants = torch.autograd.grad(want, exact, values[3].double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got, *grads), (want, *wants)):
        torch.testing.assert_close(g.double(), w, rtol=5e-3, atol=5e-3 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fused_qkv_slices_are_not_copied(monkeypatch):
    B, T, H, D = 2, 24, 2, 16
    fused = torch.randn(B, T, 3 * H * D, device=DEVICE, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in fused.split(H * D, dim=2))  # (B, H, T, D) views
    launched = []
    for name in ("forward_plan", "backward_plan"):
        plan = getattr(attn, name)
        monkeypatch.setattr(attn, name, lambda *a, plan=plan, **kw: launched.append(plan(*a, **kw)) or launched[-1])
    with fastgpt_kernels.use_backend("triton"):
        out = fastgpt_kernels.attention(q, k, v)
        out.sum().backward()
    assert len(launched) == 2
    expected = [(t.data_ptr(), t.stride()) for t in (q, k, v)]
    for _, launches in launched:
        for kernel, _, args, _ in launches:
            if kernel is not attn._attention_bwd_preprocess_kernel:  # the others take q, k, v first
                assert [(t.data_ptr(), t.stride()) for t in args[:3]] == expected, kernel
    # The output keeps q's (B, T, H, D) memory order, so merging the heads back is free.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (1, 2, 0, 16)])
def test_empty_inputs(shape):
    q, k, v = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    with fastgpt_kernels.use_backend("triton"):
        out = fastgpt_kernels.attention(q, k, v)
        out.sum().backward()
    assert out.shape == shape and q.grad.shape == shape


# --------------------------------------------------------------------------- dropout


def _philox4x32_10(counters, key):
    """Philox-4x32-10 (Salmon et al. 2011) in NumPy: ``counters`` (4, n) uint32, ``key`` (k0, k1)."""
    c = [x.astype(np.uint64) for x in counters]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return [x.astype(np.uint32) for x in c]


def test_numpy_philox_matches_the_published_test_vector():
    zero = np.zeros(1, dtype=np.uint32)
    out = _philox4x32_10([zero] * 4, (0, 0))
    assert [int(x[0]) for x in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_dropout_mask_is_the_documented_philox_stream():
    B, H, T, p = 1, 2, 37, 0.3
    rng = torch.tensor([0x123456789ABCDEF, 0xFEDCBA987], dtype=torch.int64, device=DEVICE)
    got = dropout_mask(rng, (B, H, T, 16), p).cpu().numpy()
    bh, i, j = np.meshgrid(np.arange(B * H), np.arange(T), np.arange(T), indexing="ij")
    seed, offset = int(rng[0]), int(rng[1])
    counters = [x.ravel().astype(np.uint32) for x in (j // 4, i, bh, np.full_like(j, offset & 0xFFFFFFFF))]
    words = np.stack(_philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)))  # (4, n)
    word = words[j.ravel() % 4, np.arange(j.size)]
    expected = (word >> 8).astype(np.float32) >= np.float32(p) * np.float32(2**24)
    assert np.array_equal(got.reshape(-1), expected)


def test_kept_fraction_is_within_binomial_bounds():
    p, shape = 0.3, (2, 2, 128, 64)
    keep = dropout_mask(attn.draw_rng_state(DEVICE), shape, p)
    n = keep.numel()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) < 5 * sigma
    # No structure along either axis: every row and column keeps roughly 1 - p.
    for dim in (-1, -2):
        fractions = keep.float().mean(dim)
        assert (fractions - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / 128)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dropout_applies_the_oracle_mask_forward_and_backward(causal):
    q, k, v = qkv(B=2, T=70, D=32, requires_grad=True)
    # seeded: the same whatever tests ran before
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(11)
    with fastgpt_kernels.use_backend("triton"):
        out = fastgpt_kernels.attention(q, k, v, causal, dropout_p=0.25)
        grads = torch.autograd.grad(out, (q, k, v), dy)
    torch.manual_seed(11)
    keep = dropout_mask(attn.draw_rng_state(DEVICE), q.shape, 0.25)
    oracle = {}
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out_ref = reference.attention_math(*leaves, causal, None, keep, 0.25)
        oracle[dtype] = out_ref, torch.autograd.grad(out_ref, leaves, dy.to(dtype))
    (lowp, lowp_grads), (exact, exact_grads) = oracle[torch.float32], oracle[torch.float64]
    assert_close_to_exact(out, lowp, exact)
    for name, g, lg, eg in zip(("dq", "dk", "dv"), grads, lowp_grads, exact_grads):
        assert_close_to_exact(g, lg, eg, name)  # the backward regenerated the forward's mask


def test_seeds_advance_and_runs_reproduce_under_manual_seed():
    q, k, v = qkv(T=40, D=16, requires_grad=True)
    with fastgpt_kernels.use_backend("triton"):
        torch.manual_seed(5)
        first = fastgpt_kernels.attention(q, k, v, dropout_p=0.5)
        second = fastgpt_kernels.attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(5)
        again = fastgpt_kernels.attention(q, k, v, dropout_p=0.5)
        grads = [torch.autograd.grad(o, (q, k, v), torch.ones_like(o)) for o in (first, again)]
    assert not torch.equal(first, second)  # a new mask per call
    assert torch.equal(first, again)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    masks = [dropout_mask(attn.draw_rng_state(DEVICE), q.shape, 0.5) for _ in range(2)]
    assert not torch.equal(*masks)


def test_zero_dropout_is_no_dropout_and_draws_no_random_numbers():
    q, k, v = qkv(T=40, D=16)
    state = torch.get_rng_state()
    with fastgpt_kernels.use_backend("triton"):
        with_zero = fastgpt_kernels.attention(q, k, v, dropout_p=0.0)
        without = fastgpt_kernels.attention(q, k, v)
    assert torch.equal(with_zero, without)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- memory traffic


@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts bytes in Triton's interpreter")
def test_forward_memory_traffic_is_linear_in_T(capsys):
    """Interpreter counts (a model of traffic, not a GPU measurement) at T = 512, D = 64, one head."""
    T, D = 512, 64
    q, k, v = qkv(T=T, D=D, H=1, dtype=FP16)
    qkvo = 4 * T * D * 2
    config = next(tile.config for tile in attn.TILES["fwd"] if tile.config.kwargs["BLOCK_M"] == 128)
    with fastgpt_kernels.use_configs({"attention.fwd": config}), fastgpt_kernels.use_backend("triton"), \
            traffic.count_memory_traffic() as kernel:
        out = fastgpt_kernels.attention(q, k, v)
    with traffic.count_torch_traffic() as unfused:
        expected = reference.attention_math(q, k, v)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    with capsys.disabled():
        print(f"\nattention forward T={T} D={D} float16, per (batch, head), interpreter byte counts: kernel reads "
              f"{kernel.loaded / 1e6:.3f} MB ({kernel.distinct_loaded / 1e6:.3f} MB distinct) and writes "
              f"{kernel.stored / 1e6:.3f} MB; unfused PyTorch math reads {unfused.loaded / 1e6:.2f} MB and writes "
              f"{unfused.stored / 1e6:.2f} MB")
    assert kernel.out_of_bounds == 0
    assert kernel.distinct_loaded == 3 * T * D * 2  # q, k and v, each byte at least once
    assert kernel.stored == T * D * 2 + T * 4  # o and the float32 log-sum-exp, each once
    assert kernel.loaded <= 2 * qkvo  # causal: K and V re-read by 4 query tiles, ~2.5 times on average
    assert unfused.loaded + unfused.stored > 20 * (kernel.loaded + kernel.stored)  # (T, T) scores and weights


# --------------------------------------------------------------------------- bad input and dispatch


@pytest.mark.parametrize("backend", ["triton", "auto"])
class TestBadInput:
    def test_shape_mismatch(self, backend):
        q, k, v = qkv(T=4)
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"k must have shape \(1, 2, T_K, 16\) "
                                                                           r"with T_K >= 4 \(q's T\), got \(1, 2, 3, 16\)"):
            fastgpt_kernels.attention(q, k[:, :, :3], v)
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"v must have shape \(1, 2, 4, 16\)"):
            fastgpt_kernels.attention(q, k, v[:, :1])

    def test_three_dimensional(self, backend):
        x = torch.randn(2, 5, 16, device=DEVICE)
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=r"q must be 4-D \(B, H, T, D\)"):
            fastgpt_kernels.attention(x, x, x)

    def test_dtype_mismatch(self, backend):
        q, k, v = qkv()
        with fastgpt_kernels.use_backend(backend), pytest.raises(TypeError, match="v has dtype torch.float16 but q has"):
            fastgpt_kernels.attention(q, k, v.half())

    def test_device_mismatch(self, backend):
        q, k, v = qkv()
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match="k is on meta but q is on"):
            fastgpt_kernels.attention(q, k.to("meta"), v)

    @pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
    def test_dropout_out_of_range(self, backend, p):
        with fastgpt_kernels.use_backend(backend), pytest.raises(ValueError, match=rf"dropout_p must be in \[0, 1\), got {p}"):
            fastgpt_kernels.attention(*qkv(), dropout_p=p)


@pytest.mark.parametrize("D, dtype, reason", [
    (136, FP16, "head dimension D=136 is not supported"),
    (20, FP16, "head dimension D=20 is not supported"),
    (128, torch.float32, "D=128 in float32 is not supported"),
    (16, torch.float64, "q has dtype torch.float64"),
])
def test_unsupported_inputs_fall_back_under_auto_and_raise_under_triton(D, dtype, reason):
    q, k, v = qkv(T=5, D=D, dtype=dtype)
    assert not attn.supports(q, k, v) and reason in attn.why_unsupported(q, k, v)
    with fastgpt_kernels.use_backend("triton"), pytest.raises(fastgpt_kernels.KernelUnavailableError, match=reason):
        fastgpt_kernels.attention(q, k, v)
    with fastgpt_kernels.use_backend("auto"):
        got = fastgpt_kernels.attention(q, k, v)
    torch.testing.assert_close(got, reference.attention(q, k, v))


def test_supported_head_dims():
    for D in range(8, 129, 8):
        assert attn.supports(*qkv(T=2, D=D, dtype=FP16)), D
    assert attn.supports(*qkv(T=2, D=64, dtype=torch.float32))


def test_auto_runs_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "attention", lambda *a: calls.append("kernel") or a[0])
    monkeypatch.setattr(reference, "attention", lambda *a: calls.append("reference") or a[0])
    for backend in ("auto", "triton", "torch"):
        with fastgpt_kernels.use_backend(backend):
            fastgpt_kernels.attention(*qkv())
    assert calls == ["kernel", "kernel", "reference"]


@pytest.mark.slow
def test_torch_compile_keeps_the_kernel_in_one_graph():
    proj = torch.randn(16, 16, device=DEVICE, requires_grad=True)

    def block(q, k, v):
        return (fastgpt_kernels.attention(q * 2, k, v) @ proj).relu()

    compiled = torch.compile(block, fullgraph=True)  # fails on any graph break
    q, k, v = qkv(T=24, D=16, requires_grad=True)
    with fastgpt_kernels.use_backend("triton"):
        got = compiled(q, k, v)
        got.sum().backward()
    grads = [t.grad for t in (q, k, v, proj)]
    for t in (q, k, v, proj):
        t.grad = None
    with fastgpt_kernels.use_backend("torch"):
        expected = block(q, k, v)
        expected.sum().backward()
    torch.testing.assert_close(got, expected, **float32_tolerance())
    for g, t in zip(grads, (q, k, v, proj)):
        torch.testing.assert_close(g, t.grad, **float32_tolerance())


# --------------------------------------------------------------------------- verify catches a wrong attention


ATTENTION_MUTANTS = output_mutants(("dq", "dk", "dv"))


def attention_names(plan):
    return ("out", "lse") if len(plan[0]) == 2 else ("dq", "dk", "dv")  # forward (o, lse), backward (dq, dk, dv)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mutant", ATTENTION_MUTANTS)
def test_verify_fails_a_wrong_output_or_gradient(monkeypatch, dtype, mutant):
    """The kernels' results made wrong after their launches, at the suite's longest sequence: every
    mutant must fail verify's bound for its tensor; a gradient mutant only its own (a wrong output
    also feeds the backward's row sums of dO * O)."""
    tensor, factor = ATTENTION_MUTANTS[mutant]
    scale_after_launch(monkeypatch, attn, attention_names, tensor, factor)
    checks = {c.tensor: c for c in attention_checks(1, 2, 257, 64, dtype, device=DEVICE)}
    assert not checks[tensor].passed, f"verify passed {mutant}: {checks[tensor]}"
    if tensor != "out":
        assert all(c.passed for name, c in checks.items() if name != tensor)


def attention_without_the_row_term(q, k, v, causal, dropout_p, softmax_scale):
    """Attention whose backward drops the softmax Jacobian's row term: dS = P * dP instead of
    P * (dP - rowsum(dO * O)) (the log-sum-exp is held constant). The forward is exact."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if causal:
        t_q, t_k = s.shape[-2:]
        s = s.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool, device=s.device).tril(t_k - t_q).logical_not(),
                          float("-inf"))
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True).detach())
    return (p @ v.float()).to(q.dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_verify_fails_a_backward_without_the_softmax_row_term(monkeypatch, dtype):
    monkeypatch.setattr(attn, "attention", attention_without_the_row_term)
    checks = {c.tensor: c for c in attention_checks(1, 2, 257, 64, dtype, device=DEVICE)}
    assert not checks["dq"].passed and not checks["dk"].passed, [str(checks[t]) for t in ("dq", "dk")]
    assert checks["dv"].passed  # P itself is right
