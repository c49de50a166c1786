"""The GPT model's hyper-parameters (:class:`GPTConfig`) and fixed constants: plain data, which the
model (:mod:`fastgpt.model`) and the Hugging Face conversion (:mod:`fastgpt.pretrained`) both read."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

LAYER_NORM_EPS = 1e-5
"""The epsilon of every LayerNorm, GPT-2's."""


@dataclass
class GPTConfig:
    """Model hyper-parameters; the defaults are GPT-2 small (124M).

    ``vocab_size`` defaults to 50304, GPT-2's 50257 padded up to a multiple of 64 for faster matmuls.
    ``dropout`` applies to the embeddings, the attention weights and both residual branches (training
    mode only). ``bias`` adds biases to the Linear layers and LayerNorms.
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"dropout must be a real number, got {type(self.dropout).__name__}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
