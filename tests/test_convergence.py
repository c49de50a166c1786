"""Convergence A/B, in the style of Liger-Kernel's: a small GPT trained with fastgpt's kernels against
the same GPT in plain PyTorch (:mod:`bench.plain`), from the same weights on the same batches, in
float32, bfloat16 autocast and float16 autocast with a GradScaler.

The bound is the project's 2x rule applied to training: against plain PyTorch in float32 (the
exact run here), the kernels' per-step losses and final parameters may be at most twice as far off
as plain PyTorch's own in the same precision, plus a floor for float32, where plain PyTorch's run
is the exact one: Liger's float32 loss tolerance (rtol 2e-5), and 1e-3 of the parameters' update
for the drift 30 AdamW steps make of rounding-level differences (3.6e-5 measured here). Parameters
are compared as the whole update (final minus initial, every tensor), relative to its norm.

Seen failing: with LayerNorm's dx made 2% low, the float32 case's update error is 1.3e-2 against
its floor of 1e-3. In float16 the same mutant stays inside the bound (2.9e-2 against 2 x 2.5e-2):
30 steps of float16 training are that far from float32 by themselves, so errors of a few percent
are verify's to catch (tests/test_*.py check every op against float64), not this test's.
"""
import pytest
import torch

import fastgpt_kernels
from bench.plain import PlainGPT
from conftest import ALL_DTYPES, DEVICE
from fastgpt.model import GPT, GPTConfig
from fastgpt_kernels import _dispatch

CONFIG = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
STEPS, BATCH = 30, 4
LOSS_FLOOR, UPDATE_FLOOR = 2e-5, 1e-3

pytestmark = pytest.mark.skipif(_dispatch.NO_TRITON_REASON is not None, reason="needs the kernels")


def train(kernels: bool, dtype: torch.dtype, steps: int = STEPS):
    """Per-step losses and the final parameters (flattened) of fastgpt's GPT on the ``triton``
    backend (``kernels``) or of plain PyTorch's GPT with the same initial weights."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    if not kernels:
        plain = PlainGPT(GPTConfig(**CONFIG))
        plain.load_state_dict(model.state_dict())
        model = plain
    model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(DEVICE, enabled=dtype == torch.float16)
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        idx, targets = (torch.randint(CONFIG["vocab_size"], (BATCH, CONFIG["block_size"]), generator=gen).to(DEVICE)
                        for _ in range(2))
        with fastgpt_kernels.use_backend("triton" if kernels else "torch"), \
                torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    params = torch.cat([p.detach().double().flatten().cpu() for _, p in sorted(model.named_parameters())])
    return torch.tensor(losses, dtype=torch.float64), params


@pytest.fixture(scope="module")
def exact():
    """Plain PyTorch in float32: the initial parameters, the losses and the final parameters."""
    start = train(False, torch.float32, steps=0)[1]
    return start, *train(False, torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_training_with_the_kernels_follows_plain_pytorch(exact, dtype):
    start, exact_losses, exact_params = exact
    kernel_losses, kernel_params = train(True, dtype)
    plain_losses, plain_params = train(False, dtype)
    floor = dtype == torch.float32

    def loss_error(losses):
        return ((losses - exact_losses).abs() / exact_losses.abs()).max().item()

    def update_error(params):
        return ((params - exact_params).norm() / (exact_params - start).norm()).item()

    assert kernel_losses[-1] < kernel_losses[0]  # it learns
    assert loss_error(kernel_losses) <= 2 * loss_error(plain_losses) + LOSS_FLOOR * floor, \
        (loss_error(kernel_losses), loss_error(plain_losses))
    assert update_error(kernel_params) <= 2 * update_error(plain_params) + UPDATE_FLOOR * floor, \
        (update_error(kernel_params), update_error(plain_params))
