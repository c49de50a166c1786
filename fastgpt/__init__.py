"""fastgpt: GPT-2 models whose hot paths run fused Triton kernels from :mod:`fastgpt_kernels`.

``fastgpt.model`` holds :class:`GPTConfig` and :class:`GPT` (GPT-2 architecture and parameter
names; ``logits, loss = model(idx, targets)``; ``model.generate(...)``). Which implementation of
each op runs, Triton kernel or PyTorch reference, is chosen in :mod:`fastgpt_kernels`
(``FASTGPT_BACKEND=auto|triton|torch``).
"""
from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
