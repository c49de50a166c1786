"""fastgpt: GPT-2 models whose hot paths run fused Triton kernels from :mod:`fastgpt_kernels`.

``fastgpt.model`` holds :class:`GPTConfig` and :class:`GPT` (GPT-2 architecture and parameter
names; ``logits, loss = model(idx, targets)``; ``model.generate(...)``). Which implementation of
each op runs, Triton kernel or PyTorch reference, is chosen in :mod:`fastgpt_kernels`
(``FASTGPT_BACKEND=auto|triton|torch``).

Importing the package imports no torch: ``GPT`` and ``GPTConfig`` come from :mod:`fastgpt.model` on
first use, so ``fastgpt-prepare`` runs without it.
"""
from fastgpt_kernels._lazy import lazy_attributes

_HOMES = dict.fromkeys(["GPT", "GPTConfig"], ".model")  # each public name's module
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
