"""The Triton implementations of the ops, one module per op: kernels, launchers, autograd registration.

Each module ``fastgpt_kernels.ops.<op>`` holds the op's ``@triton.jit`` kernels (forward and backward), the
host code that plans their launches, the ``torch.library`` custom ops with their autograd, and
``why_unsupported(...)``, which says which inputs the kernels do not take. Use the public functions
of :mod:`fastgpt_kernels` (``fastgpt_kernels.attention`` etc.): they validate inputs and choose between these kernels
and the PyTorch references.
"""
