"""fastgpt.model: GPT-2 names, init and tying, the forward against a hand-written one, sampling,
training, and agreement between the kernel and reference backends."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgpt_kernels
from conftest import DEVICE, float32_tolerance
from fastgpt import perf
from fastgpt.model import GPT, GPTConfig
from fastgpt_kernels import _dispatch, reference
from fastgpt_kernels.tools.checking import assert_close_to_exact

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def tokens(B, T, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These shapes are far too small to split across threads; on a busy machine the threads'
    # synchronisation alone costs milliseconds per matmul.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def reference_backend():
    # The PyTorch path keeps these tests fast; the backend-agreement test switches explicitly.
    with fastgpt_kernels.use_backend("torch"):
        yield


def gpt2_names(n_layer, bias=True):
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"]
    per_block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    for i in range(n_layer):
        names += [f"transformer.h.{i}.{m}.weight" for m in per_block]
        if bias:
            names += [f"transformer.h.{i}.{m}.bias" for m in per_block]
    return set(names) | ({"transformer.ln_f.bias"} if bias else set())


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_are_gpt2s(bias):
    model = tiny_model(bias=bias)
    assert set(model.state_dict()) == gpt2_names(2, bias)
    # lm_head.weight is the same tensor as wte.weight, so parameters() lists it once.
    assert {n for n, _ in model.named_parameters()} == gpt2_names(2, bias) - {"lm_head.weight"}


def test_shapes_of_a_block():
    sd = tiny_model().state_dict()
    assert sd["transformer.wte.weight"].shape == (50, 32)
    assert sd["transformer.wpe.weight"].shape == (16, 32)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (32, 128)


def test_weights_are_tied():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = tokens(2, 8)
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_gpt2_initialisation():
    model = tiny_model(n_embd=64, n_layer=3)
    residual_std = 0.02 / math.sqrt(2 * 3)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert name.endswith(".bias") and torch.equal(p, torch.zeros_like(p)), name


def manual_forward(sd, cfg, idx, targets):
    """The GPT-2 forward written out from a state_dict with fastgpt_kernels.reference ops."""
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(cfg.n_layer):
        p = {k.removeprefix(f"transformer.h.{i}."): v for k, v in sd.items() if k.startswith(f"transformer.h.{i}.")}
        h = reference.layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
        qkv = h @ p["attn.c_attn.weight"].T + p["attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, nh, C // nh).permute(0, 2, 1, 3) for t in qkv.chunk(3, dim=-1))
        y = reference.attention_math(q, k, v, causal=True).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ p["attn.c_proj.weight"].T + p["attn.c_proj.bias"]
        h = reference.layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
        x = x + reference.gelu_mlp(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], p["mlp.c_proj.weight"],
                                   p["mlp.c_proj.bias"])
    x = reference.layer_norm(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    logits = x @ sd["lm_head.weight"].T
    return logits, F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


def test_forward_equals_a_hand_written_composition_of_reference_ops():
    model = tiny_model()
    idx, targets = tokens(3, 16, seed=1), tokens(3, 16, seed=2)
    logits, loss = model(idx, targets, return_logits=True)
    no_logits, fused_loss = model(idx, targets)  # the loss without the (B, T, V) logits
    expected_logits, expected_loss = manual_forward(model.state_dict(), model.config, idx, targets)
    exact_logits, exact_loss = manual_forward({k: v.double() for k, v in model.state_dict().items()}, model.config,
                                              idx, targets)
    assert logits.shape == (3, 16, 50) and no_logits is None
    assert_close_to_exact(logits, expected_logits, exact_logits)
    assert_close_to_exact(loss, expected_loss, exact_loss, "loss")
    assert_close_to_exact(fused_loss, expected_loss, exact_loss, "fused loss")


def test_without_targets_only_the_last_position_is_returned():
    model = tiny_model()
    idx = tokens(2, 11)
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 1, 50)
    full, _ = model(idx, idx, return_logits=True)
    torch.testing.assert_close(logits, full[:, -1:])


def test_targets_of_minus_one_are_ignored():
    model = tiny_model()
    idx, targets = tokens(2, 16, seed=3), tokens(2, 16, seed=4)
    targets[0, :5] = -1
    targets[1, 9] = -1
    logits, loss = model(idx, targets, return_logits=True)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model(idx, targets)[1], expected)


def test_generate_crops_the_context_and_is_reproducible():
    model = tiny_model(block_size=8).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    idx = tokens(2, 3)
    torch.manual_seed(7)
    first = model.generate(idx, 20)
    torch.manual_seed(7)
    second = model.generate(idx, 20)
    assert first.shape == (2, 23) and first.dtype == torch.long
    assert torch.equal(first[:, :3], idx)
    assert torch.equal(first, second)
    # Without the cache every step runs the whole context, at most the last 8 tokens.
    seen.clear()
    model.generate(idx, 20, use_cache=False)
    assert max(seen) == 8 and seen[:6] == [3, 4, 5, 6, 7, 8] and len(seen) == 20
    # With it, the prompt, then one token a step until the context passes block_size; then the
    # window of the last 8 tokens is run whole each step (its positions shift with every token).
    seen.clear()
    model.generate(idx, 20)
    assert seen == [3, 1, 1, 1, 1, 1] + [8] * 14


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("prompt, new", [(5, 20), (3, 40)], ids=["within-block", "past-block"])
def test_greedy_generation_with_the_cache_equals_it_without(backend, prompt, new):
    model = tiny_model(block_size=32).eval()
    idx = tokens(2, prompt, seed=5)
    with fastgpt_kernels.use_backend(backend):
        cached = model.generate(idx, new, top_k=1)
        uncached = model.generate(idx, new, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_cache_goes_with_generation_not_with_targets():
    from fastgpt.model import KVCache

    model = tiny_model(block_size=8)
    cache = KVCache(8)
    with pytest.raises(ValueError, match="a KVCache serves generation"):
        model(tokens(1, 3), tokens(1, 3), cache=cache)
    model.eval()(tokens(1, 6), cache=cache)
    assert cache.length == 6
    with pytest.raises(ValueError, match="the cache holds 6 positions: 3 more exceed block_size=8"):
        model(tokens(1, 3), cache=cache)  # 6 held + 3 new > 8 positions


def test_top_k_one_is_greedy():
    model = tiny_model().eval()
    idx = tokens(2, 4)
    out = model.generate(idx, 5, temperature=0.7, top_k=1)
    expected = idx
    for _ in range(5):
        logits, _ = model(expected)
        expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, expected)


def test_top_k_larger_than_the_vocabulary_is_clamped():
    model = tiny_model().eval()
    assert model.generate(tokens(1, 4), 3, top_k=10_000).shape == (1, 7)


def test_num_params_and_flops_per_token():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 32
    # The linear weights: per layer c_attn 3C^2, c_proj C^2, c_fc and the MLP's c_proj 4C^2 each, and
    # the tied lm_head V C once. FLOPs per token: 6 per linear weight, and per layer 6 C T for the
    # causal half of attention's two matmuls (C = 32, L = 2, V = 50).
    linear = 2 * 12 * 32 * 32 + 50 * 32
    assert perf.linear_weights(model) == linear
    assert perf.training_flops_per_token(linear, 2, 32, 16) == 6 * linear + 6 * 2 * 32 * 16
    assert perf.training_flops_per_token(linear, 2, 32, 4) == 6 * linear + 6 * 2 * 32 * 4


def test_configure_optimizers_decays_only_matrices():
    model = tiny_model()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["lr"] == 1e-3 and decay["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"]  # one fused kernel on CUDA and CPU
    other = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="mps")
    assert not other.defaults["fused"]


def test_overfits_a_fixed_batch():
    model = tiny_model()
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu")
    idx, targets = tokens(4, 16, seed=5), tokens(4, 16, seed=6)
    losses = []
    for _ in range(100):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(50), rel=0.05)  # ~uniform predictions at init
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def _train_sgd(dtype, fused: bool, steps: int, vocab: int = 16384):
    """A one-layer model's parameters after ``steps`` SGD steps on random tokens, in float32 or under
    float16 autocast with a GradScaler at its default scale (65536); the loss fused or from the logits."""
    model = tiny_model(seed=3, vocab_size=vocab, block_size=32, n_layer=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # parameters move by the gradient as it is
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, enabled=dtype == torch.float16)
    for step in range(steps):
        idx, targets = tokens(32, 32, vocab, seed=100 + step), tokens(32, 32, vocab, seed=200 + step)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx, targets, return_logits=not fused)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), scaler.get_scale()


@pytest.mark.slow
def test_float16_training_with_a_grad_scaler_fused_against_unfused():
    # 1024 tokens a batch over a 16384-token vocabulary: every probability / n_valid is below
    # float16's smallest subnormal at initialisation. Before the fix the fused loss's float16 run
    # drifted by 86% of the float32 update (and skipped its first step on an inf); the unfused by 0.05%.
    start, _ = _train_sgd(torch.float32, fused=True, steps=0)
    exact, _ = _train_sgd(torch.float32, fused=True, steps=4)
    errors = {}
    for fused in (False, True):
        params, scale = _train_sgd(torch.float16, fused, steps=4)
        assert scale == 65536.0, f"fused={fused}: GradScaler met an inf or a NaN and lowered its scale to {scale}"
        errors[fused] = ((params - exact).norm() / (exact - start).norm()).item()
    assert errors[True] <= 2 * errors[False], f"float16 drift from float32: fused {errors[True]:.2e}, " \
                                              f"unfused {errors[False]:.2e}"


def _step_with_recompute(model, recompute, dtype, idx, targets):
    """Loss and gradients of one training step with ``recompute``, from the same random state; in
    float16 under a loss scale of 2**16, as training's GradScaler starts."""
    model.recompute = recompute
    torch.manual_seed(7)  # dropout's masks
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(idx, targets)
    (loss * 2.0**16 if dtype == torch.float16 else loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_recompute_gives_the_same_loss_and_gradients_under_dropout(backend, dtype, recompute):
    # The same dropout masks in the recomputed forward (torch.utils.checkpoint restores the random
    # state; the attention kernel draws its Philox seed from it), so the step is bit for bit the same.
    if backend == "triton" and fastgpt_kernels._dispatch.NO_TRITON_REASON is not None:
        pytest.skip(fastgpt_kernels._dispatch.NO_TRITON_REASON)
    model = tiny_model(dropout=0.2, n_layer=2)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    with fastgpt_kernels.use_backend(backend):
        loss, grads = _step_with_recompute(model, "none", dtype, idx, targets)
        loss_r, grads_r = _step_with_recompute(model, recompute, dtype, idx, targets)
    assert torch.equal(loss, loss_r)
    for (name, _), g, g_r in zip(model.named_parameters(), grads, grads_r):
        assert torch.equal(g, g_r), name
    assert model.recompute == recompute
    model.eval()
    with torch.no_grad():  # nothing to recompute without a backward: the forward is the same
        assert torch.equal(model(idx, targets)[1], tiny_model(dropout=0.2, n_layer=2).eval()(idx, targets)[1])


def test_recompute_keeps_less_for_the_backward():
    from bench import measure

    model = tiny_model(n_layer=4, n_embd=64, n_head=2, block_size=64)
    idx, targets = tokens(8, 64), tokens(8, 64, seed=2)
    peaks = {}
    for recompute in ("none", "mlp", "block"):
        model.recompute = recompute
        peaks[recompute] = measure.peak_memory(lambda: model(idx, targets)[1].backward(), torch.device("cpu"))
        model.zero_grad(set_to_none=True)
    assert peaks["block"] < peaks["mlp"] < peaks["none"], peaks


def test_recompute_must_be_a_known_mode():
    model = tiny_model()
    with pytest.raises(ValueError, match="recompute must be one of none, mlp, block, got 'all'"):
        model.recompute = "all"
    assert model.recompute == "none"


class TestBadInput:
    def test_n_embd_not_divisible_by_n_head(self):
        with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
            GPTConfig(n_embd=30, n_head=4)

    @pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
    def test_sizes_must_be_positive(self, field):
        with pytest.raises(ValueError, match=f"{field} must be positive, got 0"):
            GPTConfig(**{field: 0})

    def test_sizes_must_be_integers(self):
        with pytest.raises(TypeError, match="n_layer must be an integer, got float"):
            GPTConfig(n_layer=2.0)

    @pytest.mark.parametrize("dropout", [-0.1, 1.0, math.nan])
    def test_dropout_range(self, dropout):
        with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\), got {dropout}"):
            GPTConfig(dropout=dropout)

    def test_sequence_longer_than_block_size(self):
        with pytest.raises(ValueError, match="sequence length T=17 exceeds block_size=16"):
            tiny_model()(tokens(1, 17))

    def test_idx_dtype_and_shape(self):
        model = tiny_model()
        with pytest.raises(TypeError, match="idx must be an int64 tensor of token ids, got dtype torch.float32"):
            model(torch.zeros(1, 4))
        with pytest.raises(ValueError, match=r"idx must have shape \(B, T\) with T >= 1, got \(4,\)"):
            model(tokens(1, 4)[0])
        with pytest.raises(ValueError, match=r"targets must have idx's shape \(1, 4\), got \(1, 3\)"):
            model(tokens(1, 4), tokens(1, 3))

    @pytest.mark.parametrize("temperature", [0, -1.0, math.inf])
    def test_temperature(self, temperature):
        with pytest.raises(ValueError, match=f"temperature must be finite and > 0, got {temperature}"):
            tiny_model().generate(tokens(1, 2), 1, temperature=temperature)

    @pytest.mark.parametrize("top_k, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
    def test_top_k(self, top_k, error):
        with pytest.raises(error, match=f"top_k must be None or .*{top_k if error is ValueError else 'float'}"):
            tiny_model().generate(tokens(1, 2), 1, top_k=top_k)

    def test_max_new_tokens(self):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
            tiny_model().generate(tokens(1, 2), -1)


@pytest.mark.slow
def test_the_kernels_agree_with_plain_pytorch_on_a_tiny_model():
    """Logits, loss, every gradient and three SGD steps: fastgpt's GPT under "auto" (the Triton
    kernels, asserted to run) against plain PyTorch's GPT (:mod:`bench.plain`: F.layer_norm, SDPA,
    F.cross_entropy on the logits; no code shared with fastgpt_kernels' references). Each tensor is
    compared relative to its own largest value, so small gradients (LayerNorm's) are held as tightly
    as large ones; the parameters by their updates. (SGD, not AdamW: the key bias's gradient is zero
    but for rounding, and AdamW would turn that noise into full-size steps that differ by backend.)"""
    from bench.plain import PlainGPT

    with fastgpt_kernels.use_backend("auto"):
        assert _dispatch.use_kernel("layer_norm", torch.randn(2, 32, device=DEVICE), None, None), \
            "the LayerNorm kernel must run under auto for this test to compare anything"
        mlp = tiny_model().transformer.h[0].mlp
        assert _dispatch.use_kernel("gelu_mlp", torch.randn(2, 32, device=DEVICE), mlp.c_fc.weight, mlp.c_fc.bias,
                                    mlp.c_proj.weight, mlp.c_proj.bias), "the GELU MLP kernels must run under auto"
        q = torch.randn(2, TINY["n_head"], 16, TINY["n_embd"] // TINY["n_head"], device=DEVICE)
        assert _dispatch.use_kernel("attention", q, q, q), "the attention kernels must run under auto"
        wte = tiny_model().transformer.wte.weight
        assert _dispatch.use_kernel("linear_cross_entropy", torch.randn(2, 32, device=DEVICE), wte, None,
                                    tokens(1, 2)[0].to(DEVICE)), "the fused loss's kernels must run under auto"
    kernels = tiny_model().to(DEVICE)
    plain = PlainGPT(GPTConfig(**TINY)).to(DEVICE)
    plain.load_state_dict(kernels.state_dict())
    models = {"auto": kernels, "torch": plain}
    start = {n: p.detach().clone() for n, p in kernels.named_parameters()}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for b, m in models.items()}
    relative = float32_tolerance(DEVICE)["rtol"]

    def assert_close(got, want, what):
        torch.testing.assert_close(got, want, rtol=relative, atol=relative * want.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")

    for step in range(3):
        idx, targets = tokens(2, 16, seed=10 + step).to(DEVICE), tokens(2, 16, seed=20 + step).to(DEVICE)
        results = {}
        for backend, model in models.items():
            with fastgpt_kernels.use_backend(backend):
                logits, loss = model(idx, targets, return_logits=False) if backend == "auto" else model(idx, targets)
                opts[backend].zero_grad(set_to_none=True)
                loss.backward()  # fastgpt's: the fused lm_head + loss
                with torch.no_grad():
                    logits = model(idx)[0][:, -1:] if backend == "torch" else model(idx)[0]
            results[backend] = logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}
            opts[backend].step()
        (logits_k, loss_k, grads_k), (logits_r, loss_r, grads_r) = results["auto"], results["torch"]
        assert_close(logits_k, logits_r, f"step {step} logits")
        assert_close(loss_k, loss_r, f"step {step} loss")
        for name in grads_r:
            assert_close(grads_k[name], grads_r[name], f"step {step} d{name}")
    params_r = dict(plain.named_parameters())
    for name, p in kernels.named_parameters():
        assert_close(p - start[name], params_r[name] - start[name], f"{name}'s update over 3 SGD steps")
