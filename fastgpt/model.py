"""The GPT-2 model: modules in the order data flows through them, sampling (its configuration is
:mod:`fastgpt.config`'s).

The architecture and parameter names follow GPT-2 (and nanoGPT), so checkpoints convert by name:
token and position embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention, then a GELU
MLP, each added to the residual stream), a final LayerNorm and a language-model head tied to the
token embedding. The hot paths call :mod:`fastgpt_kernels` only; which implementation runs (Triton kernel
or PyTorch reference) is decided there, never here.

Shape names: B batch, T sequence length, C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import fastgpt_kernels
from fastgpt import optim
from fastgpt.config import LAYER_NORM_EPS, GPTConfig

# GPTConfig and LAYER_NORM_EPS are handed on from fastgpt.config: the model's users import them here.
__all__ = ["GPTConfig", "LAYER_NORM_EPS", "RECOMPUTE", "LayerNorm", "CausalSelfAttention", "MLP", "Block", "KVCache",
           "GPT"]

RECOMPUTE = ("none", "mlp", "block")
"""What a block recomputes in the backward instead of keeping from the forward (:attr:`GPT.recompute`):
nothing, its MLP (with ``ln_2``), or all of it."""


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with a weight and an optional bias (eps :data:`LAYER_NORM_EPS`)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return fastgpt_kernels.layer_norm(x, self.weight, self.bias, LAYER_NORM_EPS)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused query/key/value projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C), views
        # Views, not copies: the heads are strided slices of c_attn's output.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, nh, T_past + T, hs): the new queries are the last T
        y = fastgpt_kernels.attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: C -> 4C -> GELU (tanh) -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = fastgpt_kernels.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias,
                                     self.c_proj.weight, self.c_proj.bias)  # (B, T, C)
        return self.dropout(x)


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    ``recompute`` (one of :data:`RECOMPUTE`, set through :attr:`GPT.recompute`): when autograd will
    want a backward, keep only the input of the MLP branch, or of the whole block, and run that part
    again in the backward (``torch.utils.checkpoint``, which restores the random state, so dropout
    draws the same masks).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.recompute = "none"

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        if self.recompute == "block" and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._branches, x, use_reentrant=False)
        return self._branches(x, cache, layer)

    def _branches(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        if self.recompute == "mlp" and cache is None and torch.is_grad_enabled():
            return x + torch.utils.checkpoint.checkpoint(self._mlp_branch, x, use_reentrant=False)
        return x + self._mlp_branch(x)

    def _mlp_branch(self, x):
        return self.mlp(self.ln_2(x))


class KVCache:
    """The keys and values of every layer for the positions a generation has seen, so that each new
    token runs the model over itself alone.

    Holds (B, nh, block_size, hs) per layer, filled from the start; :meth:`extend` appends a step's
    keys and values to a layer and returns the layer's keys and values so far, and ``length``
    counts the positions held (advanced by :meth:`GPT.forward` after its last layer).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, nh, T, hs) after the positions held; ``(keys, values)`` of all of them."""
        end = self.length + k.shape[2]
        if layer == len(self._keys):  # the first step: buffers of the step's shape, dtype and device
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self._keys.append(k.new_empty(shape))
            self._values.append(v.new_empty(shape))
        self._keys[layer][:, :, self.length:end] = k
        self._values[layer][:, :, self.length:end] = v
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]


class GPT(nn.Module):
    """GPT-2: ``logits, loss = model(idx, targets)`` (logits None unless asked for); :meth:`generate` samples."""

    def __init__(self, config: GPTConfig):
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
        # Weight tying: the output projection is the token embedding (one tensor, two names).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(number of
        # residual additions, 2 per block), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def recompute(self) -> str:
        """What every block recomputes in the backward (:data:`RECOMPUTE`): ``"none"`` (the default),
        ``"mlp"`` or ``"block"``. Less memory for the activations, one more forward of that part."""
        return self.transformer.h[0].recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {mode!r}")
        for block in self.transformer.h:
            block.recompute = mode

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dropout: float = 0.0) -> GPT:
        """The model in a local Hugging Face GPT-2 directory (``config.json`` and ``model.safetensors``
        or ``pytorch_model.bin``), computing the same function; nothing is downloaded.

        ``dropout`` (default 0.0) is the new model's rate. The model is in training mode, as a new GPT;
        call ``eval()`` for inference. Raises FileNotFoundError for a name that is not a directory
        (saying how to download one) or missing files, ValueError for anything else that is not
        GPT-2 (see :func:`fastgpt.pretrained.read`).
        """
        from fastgpt import pretrained

        config, state = pretrained.read(path, cls, dropout)
        model = cls(config)
        model.load_state_dict(state)
        return model

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model to the directory ``path`` in the Hugging Face GPT-2 layout (``config.json``,
        ``model.safetensors``), which ``transformers.GPT2LMHeadModel.from_pretrained`` loads; returns
        the directory. See :func:`fastgpt.pretrained.save`."""
        from fastgpt import pretrained

        return pretrained.save(self, path)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = False,
                cache: KVCache | None = None):
        """The next-token logits, or the mean cross-entropy loss when ``targets`` are given.

        Args:
            idx: (B, T) int64 token ids in [0, vocab_size), 1 <= T <= block_size.
            targets: (B, T) int64 next-token ids, or None (default). Positions whose target is -1 are
                left out of the loss (if every target is -1 the loss is NaN).
            return_logits: with targets, also return the (B, T, V) logits (default False).
            cache: a :class:`KVCache` holding the keys and values of the positions before ``idx``
                (which then continue them, ``cache.length + T <= block_size``); it is extended
                with idx's. For generation: no targets.

        Returns:
            ``(logits, loss)``. Without targets: logits for the last position only, (B, 1, V), and
            None (all that sampling needs). With targets: ``(None, loss)``, the loss a scalar from
            :func:`fastgpt_kernels.linear_cross_entropy` on the tied lm_head weight, which never holds the
            (B, T, V) logits; with ``return_logits``, ``(logits, loss)``, logits (B, T, V) from the
            lm_head and the same loss computed from them.
        """
        start = 0 if cache is None else cache.length
        B, T = _check_tokens("idx", idx, self.config.block_size if cache is None else None)
        if start + T > self.config.block_size:
            raise ValueError(f"the cache holds {start} positions: {T} more exceed block_size={self.config.block_size}")
        if targets is not None:
            if cache is not None:
                raise ValueError("a KVCache serves generation: pass targets without one")
            _check_tokens("targets", targets, None)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        x = self._trunk(idx, cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        if return_logits:
            logits = self.lm_head(x)  # (B, T, V)
            return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return None, fastgpt_kernels.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1)  # scalar

    def _trunk(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Embeddings, the blocks and the final LayerNorm: (B, T, C) from (B, T) token ids (checked)."""
        start = 0 if cache is None else cache.length
        T = idx.shape[1]
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of each position's target: (B, T) float32 (float64 for a float64 model),
        0 where the target is -1; through the fused loss, so the (B, T, V) logits never exist at once.
        For evaluations that score parts of sequences (HellaSwag's endings)."""
        _check_tokens("idx", idx, self.config.block_size)
        _check_tokens("targets", targets, None)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        return fastgpt_kernels.linear_cross_entropy(self._trunk(idx), self.lm_head.weight, targets, ignore_index=-1,
                                                    reduction="none")

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to every row of ``idx``.

        Each step divides the last position's logits by ``temperature`` (finite, > 0; default 1.0;
        lower is more conservative), keeps only the ``top_k`` most likely tokens if given (a
        positive int, capped at vocab_size; 1 is greedy decoding) and samples from the softmax with
        torch's global RNG. Call ``eval()`` first unless you want dropout while sampling.

        With ``use_cache`` (default) the keys and values of every position are kept
        (:class:`KVCache`): one forward over the prompt, then one position per new token. Without it
        every step runs the model over the whole context again. Either way the model sees at most
        the last ``block_size`` tokens: once the sequence is longer, every step runs over that
        window whole (its positions shift with each token, so no cache can serve it).

        Args:
            idx: (B, T0) int64 token ids, T0 >= 1 (may exceed block_size).
            max_new_tokens: number of tokens to append, >= 0.

        Returns:
            (B, T0 + max_new_tokens) int64 tensor that starts with ``idx``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise TypeError(f"max_new_tokens must be an integer, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
                raise TypeError(f"top_k must be None or an integer, got {type(top_k).__name__}")
            if top_k <= 0:
                raise ValueError(f"top_k must be None or positive, got {top_k}")
            top_k = min(int(top_k), self.config.vocab_size)
        _check_tokens("idx", idx, None)
        cache = KVCache(self.config.block_size) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] <= self.config.block_size:
                logits, _ = self(idx[:, cache.length:], cache=cache)  # the prompt, then one token a step
            else:
                logits, _ = self(idx[:, -self.config.block_size:])  # (B, 1, V)
            logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                kth_largest = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context to ``block_size`` (<= the current one) by keeping the first positions."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}] to crop, got {block_size}")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once).

        With ``non_embedding`` (default) the position embedding is left out. The token embedding
        stays in: it is also the lm_head, a real matmul.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings (dim >= 2) only, not on biases or LayerNorm
        (:func:`fastgpt.optim.adamw`; ``fastgpt-train --optimizer muon`` builds Muon beside it)."""
        return optim.adamw(self.parameters(), weight_decay, learning_rate, betas, device_type)


def _check_tokens(name: str, tokens, block_size: int | None) -> tuple[int, int]:
    """``tokens`` is a (B, T) int64 tensor with 1 <= T (<= block_size if given); returns (B, T)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise TypeError(f"{name} must be an int64 tensor of token ids, got dtype {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
    B, T = tokens.shape
    if block_size is not None and T > block_size:
        raise ValueError(f"sequence length T={T} exceeds block_size={block_size}")
    return B, T
