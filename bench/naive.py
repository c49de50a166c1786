"""The baseline: the naive GPT of the "Let's build GPT" lecture, written the lecture's way.

Every attention head is its own module with its own key, query and value projections (no bias)
and its own lower-triangular mask buffer. A head materialises its (T, T) score matrix, scales it by
1 / sqrt(head_size), masks the future, takes the softmax, drops out weights and mixes the values.
``MultiHeadAttention`` runs the heads one after another, concatenates their outputs and projects
them. The rest is the lecture's model: a ReLU feed-forward network, pre-LayerNorm blocks, token and
position embeddings, a final LayerNorm, a separate (untied) lm_head and cross-entropy.

This is the model the benchmarks compare fastgpt against, so it is the honest naive thing and
nothing else: no fused ops, no tricks, and a test shows that its attention computes the same
function as :func:`fastgpt_kernels.reference.attention_math`.

Shape names: B batch, T sequence length, C = n_embd, hs = head size, V = vocab_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NaiveConfig:
    """The lecture's hyper-parameters by default (character-level tiny Shakespeare: 65 symbols)."""

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def masked_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tril: torch.Tensor,
                          dropout: nn.Module) -> torch.Tensor:
    """One head's causal attention, spelled out: (B, T, hs) queries, keys, values -> (B, T, hs).

    ``tril`` is a lower-triangular (>= T, >= T) matrix of ones; ``dropout`` is applied to the weights.
    """
    T, head_size = q.shape[-2], q.shape[-1]
    wei = q @ k.transpose(-2, -1) * head_size**-0.5  # (B, T, T)
    wei = wei.masked_fill(tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
    wei = F.softmax(wei, dim=-1)  # (B, T, T)
    wei = dropout(wei)
    return wei @ v  # (B, T, hs)


class Head(nn.Module):
    """One head of causal self-attention with its own projections and mask."""

    def __init__(self, config: NaiveConfig, head_size: int):
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=False)
        self.query = nn.Linear(config.n_embd, head_size, bias=False)
        self.value = nn.Linear(config.n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        return masked_head_attention(q, k, v, self.tril, self.dropout)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """``n_head`` independent heads run one by one, concatenated, then projected."""

    def __init__(self, config: NaiveConfig):
        super().__init__()
        head_size = config.n_embd // config.n_head
        self.heads = nn.ModuleList([Head(config, head_size) for _ in range(config.n_head)])
        self.proj = nn.Linear(head_size * config.n_head, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, n_head * hs)
        return self.dropout(self.proj(out))  # (B, T, C)


class FeedForward(nn.Module):
    """Linear to 4C, ReLU, Linear back to C, dropout."""

    def __init__(self, config: NaiveConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + sa(ln1(x))``, then ``x + ffwd(ln2(x))``."""

    def __init__(self, config: NaiveConfig):
        super().__init__()
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class NaiveGPT(nn.Module):
    """The lecture's language model: ``logits, loss = model(idx, targets)``."""

    def __init__(self, config: NaiveConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(B, T) token ids, T <= block_size -> logits (B, T, V) and the mean cross-entropy (or None)."""
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = self.blocks(tok_emb + pos_emb)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

    def num_params(self) -> int:
        """Parameters that take part in matmuls: all but the two embedding tables (lookups)."""
        embeddings = self.token_embedding_table.weight.numel() + self.position_embedding_table.weight.numel()
        return sum(p.numel() for p in self.parameters()) - embeddings
