"""The one source of the work figures: FLOPs of the model's ops and of a training step, the
data-sheet peaks of NVIDIA GPUs, and a device's peak FLOP/s for MFU (:func:`peak_flops`).

MFU in training (:mod:`fastgpt.train`), the benchmarks (``bench/``) and the model of a GPU step
(:mod:`bench.step_model`) all count FLOPs with these functions, so that their figures agree.

FLOPs are those a computation needs, not those an implementation spends: a matmul of (m, k) by
(k, n) is 2mkn, its backward twice that (the input and the weight gradient); causal attention
counts the half of the (T, T) scores it needs, whatever a kernel computes (FlashAttention's
backward recomputes the scores; the naive model computes the masked half too).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
import torch.nn as nn

BACKWARD_FACTOR = 2  # a matmul's backward: two matmuls of its size (input and weight gradients)


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of a forward (m, k) @ (k, n) matmul: a multiply and an add per term."""
    return 2 * m * k * n


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool = True) -> float:
    """Forward FLOPs of attention's two matmuls (q k^T and weights @ v) over every head; causal
    attention needs half the (T, T) scores."""
    full = 2 * matmul_flops(batch * heads * seq_len, head_dim, seq_len)
    return full / 2 if causal else full


def linear_weights(model: nn.Module) -> int:
    """Elements of the weights of a model's ``nn.Linear`` layers: each takes part in one multiply-add
    per token (a tied lm_head counts once; embeddings are lookups; biases and norms are not matmuls)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def training_flops_per_token(linear_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """FLOPs to train on one token of a causal transformer: forward and backward (3x the forward)
    of every linear weight, 2 FLOPs each, and of each layer's causal attention, 2 C T per token."""
    attention_per_token = attention_flops(1, 1, seq_len, n_embd) / seq_len
    return int((1 + BACKWARD_FACTOR) * (2 * linear_params + n_layer * attention_per_token))


# --------------------------------------------------------------------------- GPUs


@dataclasses.dataclass(frozen=True)
class GPU:
    """Data-sheet figures of an NVIDIA GPU: dense bfloat16/float16 tensor-core FLOP/s, HBM bytes/s."""

    name: str
    bf16_flops: float
    bandwidth: float
    # Substrings of torch.cuda.get_device_name() that name this GPU (the H100 SXM calls itself
    # "NVIDIA H100 80GB HBM3"), tried in the order of GPUS: the most specific first.
    names: tuple[str, ...]


GPUS = (
    GPU("H200", 989e12, 4.8e12, ("H200",)),
    GPU("H100 SXM", 989e12, 3.35e12, ("H100 SXM", "H100 80GB HBM3")),
    GPU("H100 NVL", 835e12, 3.9e12, ("H100 NVL",)),
    GPU("H100 PCIe", 756e12, 2.0e12, ("H100",)),
    GPU("A100 SXM", 312e12, 2.04e12, ("A100-SXM", "A100 80GB", "A100")),
    GPU("A10G", 70e12, 0.6e12, ("A10G",)),
    GPU("A10", 125e12, 0.6e12, ("A10",)),
    GPU("L40S", 362e12, 0.864e12, ("L40S",)),
    GPU("L4", 121e12, 0.3e12, ("L4",)),
    GPU("RTX A6000", 155e12, 0.768e12, ("A6000",)),
    GPU("RTX 4090", 165e12, 1.008e12, ("RTX 4090",)),
    GPU("RTX 3090", 71e12, 0.936e12, ("RTX 3090",)),
    GPU("V100", 125e12, 0.9e12, ("V100",)),
    GPU("T4", 65e12, 0.32e12, ("T4",)),
)
FLOAT32_FACTOR = 16  # float32 without TF32 runs at about 1/16 of the 16-bit tensor-core peak


def gpu(device_name: str) -> GPU | None:
    """The GPU that ``torch.cuda.get_device_name()`` names, or None when it is not in :data:`GPUS`."""
    for spec in GPUS:
        if any(name in device_name for name in spec.names):
            return spec
    return None


def gpu_named(name: str) -> GPU:
    """The entry of :data:`GPUS` called ``name`` (e.g. "H100 SXM")."""
    for spec in GPUS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS)}")


def _time(fn, repeats: int = 5) -> float:
    """Seconds of the fastest of ``repeats`` calls after one warm-up: a peak is a best case, and the
    first calls in a process (thread-pool start, kernel selection) run slower."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _random_matrices(n: int):
    """Two n x n matrices from a private generator: measuring must not move the global RNG."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)


def peak_flops(device: torch.device, dtype: str) -> float:
    """Peak FLOP/s for MFU: the data sheet's on NVIDIA GPUs (:data:`GPUS`; NaN for one
    not listed); on a CPU, measured once with a large matmul."""
    if device.type == "cuda":
        spec = gpu(torch.cuda.get_device_name(device))
        if spec is None:
            return float("nan")
        return spec.bf16_flops / (FLOAT32_FACTOR if dtype == "float32" else 1)
    n = 2048
    a, b = _random_matrices(n)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    def matmul():
        with ctx:
            a @ b

    return 2 * n**3 / _time(matmul)
