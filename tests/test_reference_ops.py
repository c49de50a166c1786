"""fastgpt_kernels.attention and fastgpt_kernels.gelu_mlp on their PyTorch path: oracles, validation, backend policy."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fastgpt_kernels
from fastgpt_kernels import reference


def qkv(B=2, H=3, T=17, D=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=gen).to(dtype) for _ in range(3))


def mlp_weights(C=12, hidden=48, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc_weight": torch.randn(hidden, C, generator=gen) / math.sqrt(C),
        "fc_bias": torch.randn(hidden, generator=gen) if bias else None,
        "proj_weight": torch.randn(C, hidden, generator=gen) / math.sqrt(hidden),
        "proj_bias": torch.randn(C, generator=gen) if bias else None,
    }


@pytest.fixture(autouse=True)
def reference_backend():
    # The PyTorch path; the kernels have their own test files.
    with fastgpt_kernels.use_backend("torch"):
        yield


class TestAttention:
    @pytest.mark.parametrize("T", [1, 17])
    @pytest.mark.parametrize("causal", [True, False])
    @pytest.mark.parametrize("softmax_scale", [None, 0.3])
    def test_equals_the_math_version(self, T, causal, softmax_scale):
        q, k, v = qkv(T=T)
        got = fastgpt_kernels.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
        expected = reference.attention_math(q.double(), k.double(), v.double(), causal, softmax_scale)
        assert got.shape == q.shape and got.dtype == q.dtype
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    def test_default_scale_is_inverse_sqrt_head_dim(self):
        q, k, v = qkv(D=16)
        torch.testing.assert_close(fastgpt_kernels.attention(q, k, v), fastgpt_kernels.attention(q, k, v, softmax_scale=0.25))

    def test_causal_first_position_sees_only_itself(self):
        q, k, v = qkv()
        out = fastgpt_kernels.attention(q, k, v, causal=True)
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0])

    def test_math_version_computes_low_precision_in_float32(self):
        q, k, v = qkv(dtype=torch.float16)
        got = reference.attention_math(q, k, v)
        expected = reference.attention_math(q.float(), k.float(), v.float())
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, expected.half())

    def test_math_version_dropout_mask_scales_kept_weights(self):
        q, k, v = qkv(T=5)
        p = 0.25
        keep = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)) >= p
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        expected = (scores.softmax(-1) * keep / (1 - p)) @ v
        torch.testing.assert_close(reference.attention_math(q, k, v, dropout_mask=keep, dropout_p=p), expected)

    def test_dropout_zero_is_no_dropout(self):
        q, k, v = qkv()
        torch.testing.assert_close(fastgpt_kernels.attention(q, k, v, dropout_p=0.0), fastgpt_kernels.attention(q, k, v))

    def test_dropout_is_applied_and_unbiased(self):
        q, k, v = qkv(B=1, H=1, T=1, D=4)  # one key: every kept weight is 1 / (1 - p), every dropped one 0
        torch.manual_seed(0)
        out = fastgpt_kernels.attention(q.expand(4000, 1, 1, 4), k.expand(4000, 1, 1, 4), v.expand(4000, 1, 1, 4),
                                dropout_p=0.5)
        kept = (out[:, 0, 0, 0] != 0).float()
        torch.testing.assert_close(out[kept.bool()], (2 * v).expand_as(out)[kept.bool()])
        assert abs(kept.mean().item() - 0.5) < 0.05

    def test_gradients_match_the_math_version(self):
        q, k, v = (t.double().requires_grad_() for t in qkv(T=9))
        dy = torch.randn(q.shape, dtype=torch.float64)
        got = torch.autograd.grad(fastgpt_kernels.attention(q, k, v), (q, k, v), dy)
        expected = torch.autograd.grad(reference.attention_math(q, k, v), (q, k, v), dy)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


class TestGeluMLP:
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=["2d", "3d", "1d"])
    def test_equals_the_explicit_composition(self, bias, lead):
        w = mlp_weights(bias=bias)
        x = torch.randn(*lead, 12, generator=torch.Generator().manual_seed(2))
        h = x.double() @ w["fc_weight"].double().T
        if bias:
            h = h + w["fc_bias"].double()
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        expected = h @ w["proj_weight"].double().T
        if bias:
            expected = expected + w["proj_bias"].double()
        got = fastgpt_kernels.gelu_mlp(x, **w)
        assert got.shape == x.shape and got.dtype == x.dtype
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    def test_matches_torch_functional(self):
        w = mlp_weights()
        x = torch.randn(4, 12)
        expected = F.linear(F.gelu(F.linear(x, w["fc_weight"], w["fc_bias"]), approximate="tanh"),
                            w["proj_weight"], w["proj_bias"])
        torch.testing.assert_close(fastgpt_kernels.gelu_mlp(x, **w), expected)


class TestAttentionBadInput:
    def test_not_4d(self):
        x = torch.randn(2, 5, 8)
        with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, T, D\), got shape \(2, 5, 8\)"):
            fastgpt_kernels.attention(x, x, x)

    @pytest.mark.parametrize("shape", [(2, 3, 3, 8), (2, 4, 4, 8), (2, 3, 4, 16), (3, 4, 8)])
    def test_keys_shape_mismatch(self, shape):
        """k must match q's B, H and D and have at least q's T (fewer queries than keys is allowed)."""
        q, _, _ = qkv(T=4)
        k = torch.randn(*shape)
        with pytest.raises(ValueError, match=rf"k must have shape \(2, 3, T_K, 8\) with T_K >= 4 \(q's T\), "
                                             rf"got {re.escape(str(shape))}"):
            fastgpt_kernels.attention(q, k, k)

    def test_values_shape_mismatch(self):
        q, k, _ = qkv(T=4)
        with pytest.raises(ValueError, match=r"v must have shape \(2, 3, 4, 8\), got \(2, 3, 5, 8\)"):
            fastgpt_kernels.attention(q, k, torch.randn(2, 3, 5, 8))

    def test_empty_head_dim(self):
        x = torch.randn(1, 1, 3, 0)
        with pytest.raises(ValueError, match=r"non-empty head dimension D.*\(1, 1, 3, 0\)"):
            fastgpt_kernels.attention(x, x, x)

    def test_integer_dtype(self):
        q, k, v = qkv()
        with pytest.raises(TypeError, match="v must be a floating-point tensor, got dtype torch.int64"):
            fastgpt_kernels.attention(q, k, v.long())

    def test_not_a_tensor(self):
        q, k, v = qkv()
        with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
            fastgpt_kernels.attention(q, k.tolist(), v)

    def test_dtype_mismatch(self):
        q, k, v = qkv()
        with pytest.raises(TypeError, match="k has dtype torch.float16 but q has dtype torch.float32"):
            fastgpt_kernels.attention(q, k.half(), v)

    def test_device_mismatch(self):
        q, k, v = qkv()
        with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
            fastgpt_kernels.attention(q, k, v.to("meta"))

    @pytest.mark.parametrize("p", [-0.1, 1.0, math.nan])
    def test_bad_dropout(self, p):
        with pytest.raises(ValueError, match=rf"dropout_p must be in \[0, 1\), got {p}"):
            fastgpt_kernels.attention(*qkv(), dropout_p=p)

    def test_dropout_not_a_number(self):
        with pytest.raises(TypeError, match="dropout_p must be a real number, got str"):
            fastgpt_kernels.attention(*qkv(), dropout_p="0.1")

    @pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
    def test_bad_softmax_scale(self, scale):
        with pytest.raises(ValueError, match=f"softmax_scale must be finite and > 0, got {scale}"):
            fastgpt_kernels.attention(*qkv(), softmax_scale=scale)


class TestGeluMLPBadInput:
    def test_fc_weight_width(self):
        w = mlp_weights(C=12)
        with pytest.raises(ValueError, match=r"fc_weight must have shape \(hidden, C\) with C = x.shape\[-1\] = 10, "
                                             r"got \(48, 12\)"):
            fastgpt_kernels.gelu_mlp(torch.randn(3, 10), **w)

    def test_fc_weight_not_2d(self):
        w = {**mlp_weights(), "fc_weight": torch.randn(12)}
        with pytest.raises(ValueError, match=r"fc_weight must have shape \(hidden, C\).*got \(12,\)"):
            fastgpt_kernels.gelu_mlp(torch.randn(3, 12), **w)

    @pytest.mark.parametrize("name, bad, expected", [
        ("fc_bias", (12,), r"fc_bias must have shape \(48,\), got \(12,\)"),
        ("proj_weight", (48, 12), r"proj_weight must have shape \(12, 48\), got \(48, 12\)"),
        ("proj_bias", (48,), r"proj_bias must have shape \(12,\), got \(48,\)"),
    ])
    def test_shapes(self, name, bad, expected):
        w = {**mlp_weights(), name: torch.randn(bad)}
        with pytest.raises(ValueError, match=expected):
            fastgpt_kernels.gelu_mlp(torch.randn(3, 12), **w)

    def test_scalar_input(self):
        with pytest.raises(ValueError, match="x must have at least one dimension"):
            fastgpt_kernels.gelu_mlp(torch.tensor(1.0), **mlp_weights())

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
            fastgpt_kernels.gelu_mlp(torch.ones(3, 12, dtype=torch.long), **mlp_weights())

    def test_missing_weight(self):
        w = {**mlp_weights(), "proj_weight": None}
        with pytest.raises(TypeError, match="proj_weight must be a torch.Tensor, got NoneType"):
            fastgpt_kernels.gelu_mlp(torch.randn(3, 12), **w)

    def test_dtype_mismatch(self):
        w = mlp_weights()
        w["proj_bias"] = w["proj_bias"].double()
        with pytest.raises(TypeError, match="proj_bias has dtype torch.float64 but x has dtype torch.float32"):
            fastgpt_kernels.gelu_mlp(torch.randn(3, 12), **w)

    def test_device_mismatch(self):
        w = mlp_weights()
        w["fc_weight"] = w["fc_weight"].to("meta")
        with pytest.raises(ValueError, match="fc_weight is on meta but x is on cpu"):
            fastgpt_kernels.gelu_mlp(torch.randn(3, 12), **w)


def test_validation_runs_before_the_backend_policy():
    with fastgpt_kernels.use_backend("triton"), pytest.raises(ValueError, match="dropout_p must be in"):
        fastgpt_kernels.attention(*qkv(), dropout_p=2.0)
