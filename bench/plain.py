"""Plain PyTorch: GPT-2 written directly with ``torch.nn.functional``, the way nanoGPT writes it.

The architecture, the configuration (:class:`fastgpt.model.GPTConfig`) and the parameter names are
fastgpt's (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f, a tied
lm_head), so a state dict moves between the two as it is. The ops are PyTorch's own:
``F.layer_norm``, ``F.scaled_dot_product_attention``, ``nn.Linear`` + ``F.gelu(approximate="tanh")``
+ ``nn.Linear``, and the lm_head's (B, T, V) logits followed by ``F.cross_entropy``. Nothing of
:mod:`fastgpt_kernels` is used.

It is the other baseline of the benchmarks: what a careful user of PyTorch writes without fused
kernels of their own. A test shows that it computes the same function as fastgpt's GPT given the
same weights.

Shape names: B batch, T sequence length, C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt.model import GPT, LAYER_NORM_EPS, GPTConfig


class LayerNorm(nn.Module):
    """``F.layer_norm`` with a weight and an optional bias, as nanoGPT's."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class CausalSelfAttention(nn.Module):
    """One fused query/key/value projection, then PyTorch's scaled dot-product attention."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear to 4C, GELU (tanh), Linear back to C, dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class PlainGPT(nn.Module):
    """GPT-2 in plain PyTorch: ``logits, loss = model(idx, targets)``; starts from fastgpt's initial weights."""

    # nanoGPT's optimizer, which is fastgpt's: AdamW (fused where PyTorch has it), decay on matrices only.
    configure_optimizers = GPT.configure_optimizers

    def __init__(self, config: GPTConfig):
        # One initialisation, fastgpt's (GPT-2's), drawn first: with the same seed, the same weights as GPT(config).
        weights = GPT(config).state_dict()
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.load_state_dict(weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(B, T) token ids -> logits (B, T, V) and the mean cross-entropy against ``targets`` (or None)."""
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(B * T, -1).float(), targets.view(-1), ignore_index=-1)
