"""A model of a GPU training step, NOT a measurement: every kernel's FLOPs and bytes, turned into times.

One training step (forward, backward, AdamW) of GPT-2 124M (:class:`fastgpt.model.GPTConfig`'s
defaults: 12 layers, 12 heads of 64, 768 wide, vocabulary 50304) at B=16, T=1024, in bfloat16
autocast with float32 parameters, gradients and AdamW state, built three ways:

``naive``    the lecture's model (:mod:`bench.naive`) at GPT-2's size: every head its own
             key/query/value Linear layers (each casting the input to bfloat16 again), (T, T)
             scores, a mask, a softmax (in float32: CUDA's autocast runs softmax in float32), a
             ReLU MLP, an untied lm_head with a bias; PyTorch's default AdamW on a GPU (foreach).
``plain``    GPT-2 in plain PyTorch (:mod:`bench.plain`): ``F.layer_norm``, SDPA (FlashAttention-2:
             its backward recomputes the scores once), linear + GELU + linear, the lm_head's
             logits then ``F.cross_entropy`` in float32, autocast's casts; fused AdamW.
``fastgpt``  fastgpt's GPT on its Triton kernels: LayerNorm forward and backward (with its partial
             sums for the weight gradients), flash attention (one forward kernel; a backward of
             three: delta, dK/dV, dQ, each recomputing the scores), the MLP's GEMMs with fused
             bias and GELU epilogues (keeping only the pre-activation; the weight gradients in
             two K slices and a reduction, as ``fastgpt_kernels.ops._gemm.split_k`` picks for 132 SMs), the fused linear
             cross-entropy (:mod:`fastgpt_kernels.ops.linear_cross_entropy`: per chunk of rows, a logits
             pass for the log-sum-exp, a second for dz, then dx and an accumulated float32 dW),
             and the PyTorch ops around them (c_attn and c_proj, casts, residual adds, embedding);
             fused AdamW.

Ops (:func:`ops`). Every kernel the step launches, with the FLOPs it executes (the matmuls of
:mod:`fastgpt.perf`, times what an implementation recomputes; elementwise FLOPs are not counted:
those kernels are bound by memory) and the bytes it reads and writes, from the shapes:

- a PyTorch op reads each input once and writes each output once, the convention of
  :func:`fastgpt_kernels.tools.traffic.count_torch_traffic`, except that a gather reads only what it
  gathers (an embedding's rows, nll_loss's target logits);
- a Triton kernel reads and writes each byte it touches once, the distinct bytes of
  :func:`fastgpt_kernels.tools.traffic.count_memory_traffic`: a perfect L2 cache within a kernel, none
  between kernels.

``tests/test_step_model.py`` checks the byte formulas against those two counters at small shapes
(within :data:`BYTES_TOLERANCE`) and the FLOPs against ``torch.utils.flop_counter.FlopCounterMode``.

Time (:func:`op_seconds`). A kernel with FLOPs runs on tensor cores at
:data:`TENSOR_CORE_EFFICIENCY` of the GPU's dense bfloat16 peak, every kernel streams its bytes at
:data:`BANDWIDTH_EFFICIENCY` of HBM bandwidth; its time is the larger of the two, plus
:data:`LAUNCH_SECONDS` per launch. Data-sheet peaks from :data:`fastgpt.perf.GPUS`. Kernels do
not overlap, caches keep nothing between kernels, and everything else a real GPU does (tile
quantisation, attention's exponentials, the host's Python time per op, atomics in PyTorch's flash
backward) is left out.

Memory (:func:`memory`): parameters, gradients, AdamW state and buffers; the activations each op
group saves for the backward (``tests/test_step_model.py`` checks them against what autograd
saves at small shapes); the largest transient (the loss's); and a peak, the larger of the forward's
end (everything saved plus the loss's transient) and the backward's end (the gradients plus the
embedding's). With ``--recompute`` (:attr:`fastgpt.model.GPT.recompute`), a recomputed MLP branch or
block keeps only its input, and one layer's recomputed activations join the saved ones during its
backward; :func:`micro_batches` gives the largest micro-batch at T=1024 that fits an 80 GB GPU for
each GPT-2 size with each setting.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from bench import train_step
from fastgpt import perf
from fastgpt import train as training
from fastgpt.model import GPT, RECOMPUTE, GPTConfig
from fastgpt_kernels import reference

TENSOR_CORE_EFFICIENCY = 0.70  # of the dense bfloat16 tensor-core peak, for kernels with matmuls
BANDWIDTH_EFFICIENCY = 0.85  # of HBM bandwidth, for every kernel's bytes
LAUNCH_SECONDS = 4e-6  # fixed cost of every kernel launch
MODEL_GPUS = ("H100 SXM", "H200")
BUILDS = ("naive", "plain", "fastgpt")
PHASES = ("forward", "backward", "optimizer")
GROUPS = ("embedding", "layer norm", "attention linears", "attention core", "MLP", "residual",
          "lm_head + loss", "AdamW")
# Relative, of the counters' figures at small shapes (tests/test_step_model.py); they agree to 0.4%,
# the rest being the CPU's checks of the loss's targets, which a GPU does not make.
BYTES_TOLERANCE = 0.02

F32, LOW, INDEX, MASK = 4, 2, 8, 1  # bytes of float32, bfloat16 (autocast), int64 token ids, bool

# Launch facts of fastgpt's kernels the byte formulas depend on (tests/test_step_model.py checks them
# against fastgpt_kernels.ops): LayerNorm's backward sums dweight and dbias in float32 partial rows, one per
# program of at most this many rows (at 16384 rows, more programs than 4 per SM of either GPU);
# the loss's logits pass keeps a (max, sum) pair per this many columns, and stores one per tile of
# the largest GEMM config's width (the interpreter's choice; the autotuner's on a GPU is not known).
LAYER_NORM_ROWS_PER_PROGRAM = 16
GPU_SMS = 132  # of the H100 SXM and the H200: the MLP's weight gradients split K for them (_gemm.split_k)
LOSS_SLOT_COLUMNS = 64
LOSS_TILE_COLUMNS = 128

# PyTorch's multi-tensor kernels (foreach ops, fused AdamW) launch once per 320 chunks of 65536
# elements, or per this many tensors for 1 to 5 tensor lists, whichever comes first.
MULTI_TENSOR_CHUNKS, MULTI_TENSOR_CHUNK = 320, 65536
MULTI_TENSOR_MAX_TENSORS = (110, 64, 48, 36, 30)

# Matmuls of attention's size in a backward, in units of the forward's two (q k^T and p v): dV, dP,
# dQ, dK make 2 (perf.BACKWARD_FACTOR); FlashAttention-2's one backward kernel first recomputes the
# scores (2.5); fastgpt's dK/dV kernel recomputes the scores and dP, and its dQ kernel both again (3.5).
FLASH_BACKWARD_FACTOR = 2.5
FASTGPT_ATTENTION_DKDV_FACTOR = 2.0  # scores, dP, dV, dK
FASTGPT_ATTENTION_DQ_FACTOR = 1.5  # scores, dP, dQ


@dataclasses.dataclass(frozen=True)
class Shape:
    """A training step's shape: batch B, context T, layers, heads, width C, vocabulary V."""

    batch: int
    seq_len: int
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int

    @classmethod
    def gpt2(cls, batch: int = 16, seq_len: int = 1024) -> Shape:
        """GPT-2 124M (:class:`fastgpt.model.GPTConfig`'s defaults) at this batch and context."""
        c = GPTConfig()
        return cls(batch, seq_len, c.n_layer, c.n_head, c.n_embd, c.vocab_size)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return 4 * self.n_embd


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel (``count`` times a step: per layer, head or chunk) and what one launch does.

    ``where``: ``torch`` (a PyTorch op of the model's code), ``triton`` (one of fastgpt's Triton
    kernels) or ``kernel host`` (a PyTorch op inside one of fastgpt's kernel ops, around its launches).
    """

    name: str
    group: str
    phase: str
    where: str
    reads: float
    writes: float
    flops: float = 0.0
    launches: int = 1
    count: int = 1

    @property
    def bytes(self) -> float:
        return self.reads + self.writes


# --------------------------------------------------------------------------- PyTorch ops shared by the builds


class _Ops:
    """Collects the ops of one build and phase: ``add`` one, or the helpers for PyTorch's common ones."""

    def __init__(self, phase: str):
        self.phase = phase
        self.list: list[Op] = []

    def add(self, name, group, reads, writes, flops=0.0, count=1, where="torch", launches=1):
        self.list.append(Op(name, group, self.phase, where, reads, writes, flops, launches, count))

    def cast(self, name, group, elements, count=1, to_low=True, where="torch"):
        """A dtype cast: float32 to bfloat16 (autocast's) or back (its backward)."""
        a, b = (F32, LOW) if to_low else (LOW, F32)
        self.add(name, group, elements * a, elements * b, count=count, where=where)

    def linear(self, name, group, s: Shape, k, n, bias, cast_input, count=1):
        """An ``nn.Linear`` (k -> n) under autocast: its weight (and bias, and float32 input) cast, then the GEMM."""
        rows = s.tokens
        if bias:
            self.cast(f"{name} bias cast", group, n, count)
        self.cast(f"{name} weight cast", group, n * k, count)
        if cast_input:
            self.cast(f"{name} input cast", group, rows * k, count)
        self.add(f"{name} {'addmm' if bias else 'mm'}", group, (rows * k + n * k + (n if bias else 0)) * LOW,
                 rows * n * LOW, perf.matmul_flops(rows, k, n), count)

    def linear_backward(self, name, group, s: Shape, k, n, bias, cast_input, count=1):
        """Its backward: dx and dW GEMMs, the bias's row sum, and the casts' backwards to float32."""
        rows = s.tokens
        self.add(f"{name} dx mm", group, (rows * n + n * k) * LOW, rows * k * LOW, perf.matmul_flops(rows, n, k), count)
        self.add(f"{name} dW mm", group, (rows * n + rows * k) * LOW, n * k * LOW, perf.matmul_flops(n, rows, k), count)
        if bias:
            self.add(f"{name} db sum", group, rows * n * LOW, n * LOW, count=count)
        if cast_input:
            self.cast(f"{name} dx to float32", group, rows * k, count, to_low=False)
        self.cast(f"{name} dW to float32", group, n * k, count, to_low=False)
        if bias:
            self.cast(f"{name} db to float32", group, n, count, to_low=False)

    def layer_norm(self, s: Shape, count):
        """``F.layer_norm`` on the float32 residual stream: y, and per row the mean and 1/std."""
        n, c = s.tokens, s.n_embd
        self.add("native_layer_norm", "layer norm", (n * c + 2 * c) * F32, (n * c + 2 * n) * F32, count=count)

    def layer_norm_backward(self, s: Shape, count):
        n, c = s.tokens, s.n_embd
        self.add("native_layer_norm_backward", "layer norm", (2 * n * c + 2 * n + 2 * c) * F32, (n * c + 2 * c) * F32,
                 count=count)

    def embedding(self, s: Shape):
        n, c, t = s.tokens, s.n_embd, s.seq_len
        self.add("positions arange", "embedding", 0, t * INDEX)
        self.add("wte lookup", "embedding", n * c * F32 + n * INDEX, n * c * F32)
        self.add("wpe lookup", "embedding", t * c * F32 + t * INDEX, t * c * F32)
        self.add("tok + pos add", "embedding", (n * c + t * c) * F32, n * c * F32)

    def embedding_backward(self, s: Shape, tied: bool):
        n, c, t, v = s.tokens, s.n_embd, s.seq_len, s.vocab_size
        self.add("wpe grad sum over batch", "embedding", n * c * F32, t * c * F32)
        self.add("wpe embedding_dense_backward", "embedding", t * c * F32 + t * INDEX, t * c * F32)
        self.add("wte embedding_dense_backward", "embedding", n * c * F32 + n * INDEX, v * c * F32)
        if tied:
            self.add("tied weight grad add", "lm_head + loss", 2 * v * c * F32, v * c * F32)

    def residual(self, s: Shape):
        """The two residual adds of every layer: float32 stream + a bfloat16 branch."""
        n, c = s.tokens, s.n_embd
        self.add("residual add", "residual", n * c * (F32 + LOW), n * c * F32, count=2 * s.n_layer)

    def residual_backward(self, s: Shape):
        """Per add, the gradient cast to the branch's bfloat16, and the stream's two gradients summed."""
        n, c = s.tokens, s.n_embd
        self.cast("residual grad to bfloat16", "residual", n * c, 2 * s.n_layer)
        self.add("residual grad add", "residual", 2 * n * c * F32, n * c * F32, count=2 * s.n_layer)

    def cross_entropy(self, s: Shape):
        """``F.cross_entropy`` of the bfloat16 logits in float32: the cast, log_softmax, nll_loss."""
        nv = s.tokens * s.vocab_size
        self.cast("logits to float32", "lm_head + loss", nv, to_low=False)
        self.add("log_softmax", "lm_head + loss", nv * F32, nv * F32)
        self.add("nll_loss", "lm_head + loss", s.tokens * (F32 + INDEX), 2 * F32)

    def cross_entropy_backward(self, s: Shape):
        nv = s.tokens * s.vocab_size
        self.add("loss grad ones_like", "lm_head + loss", 0, F32)
        self.add("nll_loss_backward", "lm_head + loss", 2 * F32 + s.tokens * INDEX, nv * F32)
        self.add("log_softmax_backward", "lm_head + loss", 2 * nv * F32, nv * F32)
        self.cast("logits grad to bfloat16", "lm_head + loss", nv)


def multi_tensor_launches(elements: int, tensors: int, lists: int) -> int:
    """Launches of a PyTorch multi-tensor kernel over ``tensors`` tensors of ``elements`` in all, ``lists`` lists."""
    chunks = math.ceil(elements / MULTI_TENSOR_CHUNK) + tensors  # a partial last chunk per tensor, at worst
    return max(math.ceil(chunks / MULTI_TENSOR_CHUNKS), math.ceil(tensors / MULTI_TENSOR_MAX_TENSORS[lists - 1]))


# --------------------------------------------------------------------------- parameters


def parameter_groups(build: str, s: Shape) -> list[tuple[int, int]]:
    """``(elements, tensors)`` of each AdamW parameter group: one group for the naive model (the
    lecture's AdamW), matrices and the rest for plain and fastgpt (their ``configure_optimizers``)."""
    c, v, t, L, h = s.n_embd, s.vocab_size, s.seq_len, s.n_layer, s.hidden
    if build == "naive":
        per_layer = 3 * c * c + (c * c + c) + 4 * c + (h * c + h) + (c * h + c)
        tensors = L * (3 * s.n_head + 2 + 4 + 4) + 2 + 2 + 2  # heads' k, q, v; proj; norms; MLP; embeddings, ln_f, lm_head
        return [(v * c + t * c + L * per_layer + 2 * c + v * c + v, tensors)]
    matrices = v * c + t * c + L * (3 * c * c + c * c + h * c + c * h)
    rest = L * (4 * c + 3 * c + c + h + c) + 2 * c
    return [(matrices, 2 + 4 * L), (rest, 8 * L + 2)]


def parameters(build: str, s: Shape) -> int:
    """Parameters of the build (the tied lm_head counted once)."""
    return sum(elements for elements, _ in parameter_groups(build, s))


def adamw(o: _Ops, build: str, s: Shape):
    """One AdamW step over float32 parameters, gradients and moments (the optimizer phase)."""
    groups = parameter_groups(build, s)
    tensors = sum(n for _, n in groups)
    if build != "naive":  # fused AdamW keeps its step counts on the GPU (the foreach one on the host)
        o.add("step counts += 1", "AdamW", tensors * F32, tensors * F32, launches=len(groups))
        for elements, n in groups:  # reads p, g, m, v; writes p, m, v
            o.add("_fused_adamw_", "AdamW", 4 * elements * F32, 3 * elements * F32,
                  launches=multi_tensor_launches(elements, n, 4))
        return
    elements = sum(e for e, _ in groups)
    p = elements * F32
    for name, lists, reads, writes in (  # the foreach implementation, PyTorch's default on a GPU
            ("p *= 1 - lr * wd", 1, p, p), ("m.lerp_(g)", 2, 2 * p, p), ("v *= beta2", 1, p, p),
            ("v.addcmul_(g, g)", 2, 2 * p, p), ("denom = sqrt(v)", 2, p, p), ("denom /= bias correction", 1, p, p),
            ("denom += eps", 1, p, p), ("p.addcdiv_(m, denom)", 3, 3 * p, p)):
        o.add(f"_foreach: {name}", "AdamW", reads, writes, launches=multi_tensor_launches(elements, tensors, lists))


# --------------------------------------------------------------------------- the builds


def _naive(s: Shape, float32_softmax: bool) -> list[Op]:
    n, c, t, b, v, h, hs = s.tokens, s.n_embd, s.seq_len, s.batch, s.vocab_size, s.hidden, s.head_dim
    L, heads = s.n_layer, s.n_layer * s.n_head
    scores, soft = b * t * t, F32 if float32_softmax else LOW
    attn, core, mlp = "attention linears", "attention core", "MLP"
    fwd = _Ops("forward")
    fwd.embedding(s)
    fwd.layer_norm(s, 2 * L + 1)
    for proj in ("key", "query", "value"):
        fwd.linear(f"head {proj}", attn, s, c, hs, bias=False, cast_input=True, count=heads)
    fwd.add("scores bmm q k^T", core, 2 * n * hs * LOW, scores * LOW, 2 * b * t * t * hs, heads)
    fwd.add("scores * hs^-0.5", core, scores * LOW, scores * LOW, count=heads)
    fwd.add("tril == 0", core, t * t * F32, t * t * MASK, count=heads)
    fwd.add("masked_fill", core, scores * LOW + t * t * MASK, scores * LOW, count=heads)
    if float32_softmax:
        fwd.cast("scores to float32 (autocast softmax)", core, scores, heads, to_low=False)
    fwd.add("softmax", core, scores * soft, scores * soft, count=heads)
    if float32_softmax:
        fwd.cast("weights to bfloat16 (autocast bmm)", core, scores, heads)
    fwd.add("bmm weights @ v", core, scores * LOW + n * hs * LOW, n * hs * LOW, 2 * b * t * t * hs, heads)
    fwd.add("cat heads", core, n * c * LOW, n * c * LOW, count=L)
    fwd.linear("proj", attn, s, c, c, bias=True, cast_input=False, count=L)
    fwd.residual(s)
    fwd.linear("ffwd fc", mlp, s, c, h, bias=True, cast_input=True, count=L)
    fwd.add("relu", mlp, n * h * LOW, n * h * LOW, count=L)
    fwd.linear("ffwd proj", mlp, s, h, c, bias=True, cast_input=False, count=L)
    fwd.linear("lm_head", "lm_head + loss", s, c, v, bias=True, cast_input=True)
    fwd.cross_entropy(s)

    bwd = _Ops("backward")
    bwd.cross_entropy_backward(s)
    bwd.linear_backward("lm_head", "lm_head + loss", s, c, v, bias=True, cast_input=True)
    bwd.layer_norm_backward(s, 2 * L + 1)
    bwd.residual_backward(s)
    bwd.linear_backward("ffwd proj", mlp, s, h, c, bias=True, cast_input=False, count=L)
    bwd.add("relu backward", mlp, 2 * n * h * LOW, n * h * LOW, count=L)
    bwd.linear_backward("ffwd fc", mlp, s, c, h, bias=True, cast_input=True, count=L)
    bwd.linear_backward("proj", attn, s, c, c, bias=True, cast_input=False, count=L)
    bwd.add("bmm dv = weights^T do", core, scores * LOW + n * hs * LOW, n * hs * LOW, 2 * b * t * t * hs, heads)
    bwd.add("bmm dweights = do v^T", core, 2 * n * hs * LOW, scores * LOW, 2 * b * t * t * hs, heads)
    if float32_softmax:
        bwd.cast("dweights to float32", core, scores, heads, to_low=False)
    bwd.add("softmax backward", core, 2 * scores * soft, scores * soft, count=heads)
    if float32_softmax:
        bwd.cast("dscores to bfloat16", core, scores, heads)
    bwd.add("masked_fill backward", core, scores * LOW + t * t * MASK, scores * LOW, count=heads)
    bwd.add("scale backward", core, scores * LOW, scores * LOW, count=heads)
    bwd.add("bmm dq = dscores k", core, scores * LOW + n * hs * LOW, n * hs * LOW, 2 * b * t * t * hs, heads)
    bwd.add("bmm dk^T = q^T dscores", core, scores * LOW + n * hs * LOW, n * hs * LOW, 2 * b * t * t * hs, heads)
    bwd.add("dk^T made contiguous", core, n * hs * LOW, n * hs * LOW, count=heads)
    for proj in ("key", "query", "value"):
        bwd.linear_backward(f"head {proj}", attn, s, c, hs, bias=False, cast_input=True, count=heads)
    bwd.add("heads' dx summed", attn, 2 * n * c * F32, n * c * F32, count=3 * heads - L)
    bwd.embedding_backward(s, tied=False)
    return fwd.list + bwd.list


def _plain_block_linears(fwd: _Ops, bwd: _Ops, s: Shape):
    """c_attn and c_proj, the same PyTorch ops in the plain build and fastgpt's."""
    c, L = s.n_embd, s.n_layer
    fwd.linear("c_attn", "attention linears", s, c, 3 * c, bias=True, cast_input=True, count=L)
    fwd.linear("attn c_proj", "attention linears", s, c, c, bias=True, cast_input=False, count=L)
    bwd.linear_backward("attn c_proj", "attention linears", s, c, c, bias=True, cast_input=False, count=L)
    bwd.add("dq, dk, dv cat", "attention core", 3 * s.tokens * c * LOW, 3 * s.tokens * c * LOW, count=L)
    bwd.linear_backward("c_attn", "attention linears", s, c, 3 * c, bias=True, cast_input=True, count=L)


def _lse_bytes(s: Shape) -> int:
    """Attention's per-row log-sum-exp (B, nh, T), float32."""
    return s.batch * s.n_head * s.seq_len * F32


def _plain(s: Shape) -> list[Op]:
    n, c, v, h, L = s.tokens, s.n_embd, s.vocab_size, s.hidden, s.n_layer
    attention = perf.attention_flops(s.batch, s.n_head, s.seq_len, s.head_dim)
    fwd, bwd = _Ops("forward"), _Ops("backward")
    fwd.embedding(s)
    fwd.layer_norm(s, 2 * L + 1)
    _plain_block_linears(fwd, bwd, s)
    fwd.add("SDPA flash forward", "attention core", 3 * n * c * LOW, n * c * LOW + _lse_bytes(s), attention, L)
    fwd.residual(s)
    fwd.linear("c_fc", "MLP", s, c, h, bias=True, cast_input=True, count=L)
    fwd.add("gelu", "MLP", n * h * LOW, n * h * LOW, count=L)
    fwd.linear("mlp c_proj", "MLP", s, h, c, bias=True, cast_input=False, count=L)
    fwd.linear("lm_head", "lm_head + loss", s, c, v, bias=False, cast_input=True)
    fwd.cross_entropy(s)

    bwd.cross_entropy_backward(s)
    bwd.linear_backward("lm_head", "lm_head + loss", s, c, v, bias=False, cast_input=True)
    bwd.layer_norm_backward(s, 2 * L + 1)
    bwd.residual_backward(s)
    bwd.linear_backward("mlp c_proj", "MLP", s, h, c, bias=True, cast_input=False, count=L)
    bwd.add("gelu backward", "MLP", 2 * n * h * LOW, n * h * LOW, count=L)
    bwd.linear_backward("c_fc", "MLP", s, c, h, bias=True, cast_input=True, count=L)
    bwd.add("SDPA flash backward", "attention core", 5 * n * c * LOW + _lse_bytes(s), 3 * n * c * LOW,
            FLASH_BACKWARD_FACTOR * attention, L)
    bwd.embedding_backward(s, tied=True)
    return fwd.list + bwd.list


def loss_chunks(s: Shape) -> tuple[int, float]:
    """``(chunks, rows per chunk on average)`` of the fused loss (:func:`fastgpt_kernels.reference.chunk_rows`)."""
    chunks = math.ceil(s.tokens / reference.chunk_rows(s.tokens, s.vocab_size))
    return chunks, s.tokens / chunks


def _fastgpt_loss(fwd: _Ops, bwd: _Ops, s: Shape):
    """The fused linear cross-entropy: gradients made in the forward, scaled in the backward."""
    n, c, v = s.tokens, s.n_embd, s.vocab_size
    g, host = "lm_head + loss", "kernel host"
    chunks, rows = loss_chunks(s)
    slots, tiles = math.ceil(v / LOSS_SLOT_COLUMNS), math.ceil(v / LOSS_TILE_COLUMNS)
    gemm = perf.matmul_flops(rows, c, v)
    fwd.cast("x input cast", g, n * c)
    fwd.cast("weight cast", g, v * c)
    fwd.add("valid targets (ne, sum)", g, n * (INDEX + MASK), n * MASK + INDEX, where=host, launches=2)
    fwd.add("row scales (ne, to)", g, n * (INDEX + MASK), n * (MASK + F32), where=host, launches=2)
    fwd.add("dweight accumulator zeros", g, 0, v * c * F32, where=host)
    fwd.add("(max, sum) slots and target logit init", g, 0, rows * (2 * slots + 1) * F32, where=host, launches=3,
            count=chunks)
    fwd.add("_lce_logits_kernel lse", g, rows * c * LOW + v * c * LOW + rows * INDEX, rows * (2 * tiles + 1) * F32,
            gemm, where="triton", count=chunks)
    fwd.add("_lce_reduce_kernel", g, rows * (2 * slots + 1) * F32 + rows * INDEX, 2 * rows * F32, where="triton",
            count=chunks)
    fwd.add("chunk's loss and lse copied out", g, 2 * rows * F32, 2 * rows * F32, where=host, launches=2,
            count=chunks)
    fwd.add("_lce_logits_kernel dz", g, rows * c * LOW + v * c * LOW + rows * (INDEX + 2 * F32), rows * v * LOW,
            gemm, where="triton", count=chunks)
    fwd.add("_matmul_kernel dx = dz W", g, rows * v * LOW + v * c * LOW, rows * c * LOW, gemm, where="triton",
            count=chunks)
    fwd.add("_matmul_kernel dW += dz^T x", g, rows * v * LOW + rows * c * LOW + v * c * F32, v * c * F32, gemm,
            where="triton", count=chunks)
    fwd.add("mean loss (sum, div)", g, n * F32 + F32 + INDEX, 2 * F32, where=host, launches=2)
    fwd.add("mean's factor (clamp, to, reciprocal)", g, 2 * INDEX + F32, INDEX + 2 * F32, where=host, launches=3)
    fwd.cast("dW to bfloat16", g, v * c, where=host)
    bwd.add("loss grad ones_like", g, 0, F32)
    bwd.add("scale = dloss * factor", g, 2 * F32, F32)
    for name, elements in (("dx", n * c), ("dW", v * c)):  # in float32, rounded once to bfloat16
        bwd.cast(f"{name} to float32", g, elements, to_low=False)
        bwd.add(f"{name} *= scale", g, elements * F32 + F32, elements * F32)
        bwd.cast(f"{name} to bfloat16", g, elements)
    bwd.cast("dW to float32", g, v * c, to_low=False)
    bwd.cast("dx to float32", g, n * c, to_low=False)


def _fastgpt(s: Shape) -> list[Op]:
    n, c, h, L = s.tokens, s.n_embd, s.hidden, s.n_layer
    attention = perf.attention_flops(s.batch, s.n_head, s.seq_len, s.head_dim)
    partials = math.ceil(n / LAYER_NORM_ROWS_PER_PROGRAM) * c * F32
    norms, lse = 2 * L + 1, _lse_bytes(s)
    fwd, bwd = _Ops("forward"), _Ops("backward")
    fwd.embedding(s)
    fwd.add("_layer_norm_fwd_kernel", "layer norm", (n * c + 2 * c) * F32, (n * c + 2 * n) * F32, count=norms,
            where="triton")
    _plain_block_linears(fwd, bwd, s)
    fwd.add("_attention_fwd_kernel", "attention core", 3 * n * c * LOW, n * c * LOW + lse, attention, L,
            where="triton")
    fwd.residual(s)
    for name, elements in (("x", n * c), ("fc_weight", h * c), ("fc_bias", h), ("proj_weight", c * h),
                           ("proj_bias", c)):
        fwd.cast(f"MLP {name} cast", "MLP", elements, L)
    fwd.add("_gelu_mlp_fwd_kernel fc + GELU", "MLP", (n * c + h * c + h) * LOW, 2 * n * h * LOW,
            perf.matmul_flops(n, c, h), L, where="triton")
    fwd.add("_gelu_mlp_fwd_kernel proj", "MLP", (n * h + c * h + c) * LOW, n * c * LOW, perf.matmul_flops(n, h, c),
            L, where="triton")
    _fastgpt_loss(fwd, bwd, s)

    bwd.add("_layer_norm_bwd_dx_kernel", "layer norm", (2 * n * c + 2 * n + c) * F32, n * c * F32 + 2 * partials,
            count=norms, where="triton")
    bwd.add("_layer_norm_bwd_dwdb_kernel", "layer norm", 2 * partials, 2 * c * F32, count=norms, where="triton")
    bwd.residual_backward(s)
    bwd.add("_gelu_mlp_bwd_dpre_kernel", "MLP", (n * c + c * h + n * h) * LOW, 2 * n * h * LOW,
            perf.matmul_flops(n, c, h), L, where="triton")
    from fastgpt_kernels.ops import _gemm  # the kernels' own rule (imports Triton)

    split = _gemm.split_k(h, c, n, GPU_SMS)
    for name, weight, bias, flops in (("dW2, db2", c * h, c, perf.matmul_flops(c, n, h)),
                                      ("dW1, db1", h * c, h, perf.matmul_flops(h, n, c))):
        if split == 1:
            bwd.add(f"_gelu_mlp_bwd_dweight_kernel {name}", "MLP", (n * c + n * h) * LOW, (weight + bias) * LOW,
                    flops, L, where="triton")
        else:  # float32 partials of each K slice, added up by a second kernel
            partials = split * (weight + bias) * F32
            bwd.add(f"_gelu_mlp_bwd_dweight_kernel {name}, {split} K slices", "MLP", (n * c + n * h) * LOW, partials,
                    flops, L, where="triton")
            bwd.add(f"_gelu_mlp_bwd_split_reduce_kernel {name}", "MLP", partials, (weight + bias) * LOW, count=L,
                    where="triton")
    bwd.add("_gelu_mlp_fwd_kernel dx = dpre W1", "MLP", (n * h + h * c) * LOW, n * c * LOW,
            perf.matmul_flops(n, h, c), L, where="triton")
    for name, elements in (("proj_bias", c), ("proj_weight", c * h), ("fc_bias", h), ("fc_weight", h * c),
                           ("x", n * c)):
        bwd.cast(f"MLP d{name} to float32", "MLP", elements, L, to_low=False)
    bwd.add("_attention_bwd_preprocess_kernel", "attention core", 2 * n * c * LOW, lse, count=L, where="triton")
    bwd.add("_attention_bwd_dkdv_kernel", "attention core", 4 * n * c * LOW + 2 * lse, 2 * n * c * LOW,
            FASTGPT_ATTENTION_DKDV_FACTOR * attention, L, where="triton")
    bwd.add("_attention_bwd_dq_kernel", "attention core", 4 * n * c * LOW + 2 * lse, n * c * LOW,
            FASTGPT_ATTENTION_DQ_FACTOR * attention, L, where="triton")
    bwd.embedding_backward(s, tied=True)
    return fwd.list + bwd.list


def ops(build: str, s: Shape, float32_softmax: bool = True) -> list[Op]:
    """Every kernel of one training step of ``build`` (one of :data:`BUILDS`) at shape ``s``.

    ``float32_softmax``: the naive build's softmax runs in float32, as CUDA's autocast runs it
    (default; CPU's autocast keeps it in bfloat16, which the tests use).
    """
    if build == "naive":
        step = _naive(s, float32_softmax)
    elif build == "plain":
        step = _plain(s)
    elif build == "fastgpt":
        step = _fastgpt(s)
    else:
        raise ValueError(f"unknown build {build!r}: expected one of {', '.join(BUILDS)}")
    optimizer = _Ops("optimizer")
    adamw(optimizer, build, s)
    return step + optimizer.list


# --------------------------------------------------------------------------- time


def op_seconds(op: Op, gpu: perf.GPU) -> float:
    """The modelled time of ``op``'s ``count`` launches on ``gpu`` (see the module docstring)."""
    compute = op.flops / (TENSOR_CORE_EFFICIENCY * gpu.bf16_flops)
    memory = op.bytes / (BANDWIDTH_EFFICIENCY * gpu.bandwidth)
    return op.count * (max(compute, memory) + op.launches * LAUNCH_SECONDS)


def totals(step: list[Op], gpu: perf.GPU) -> dict[str, dict[str, float]]:
    """Per op group (and ``"step"``): seconds on ``gpu``, bytes, FLOPs and launches."""
    out = {g: {"seconds": 0.0, "bytes": 0.0, "flops": 0.0, "launches": 0} for g in (*GROUPS, "step")}
    for op in step:
        for key in (op.group, "step"):
            out[key]["seconds"] += op_seconds(op, gpu)
            out[key]["bytes"] += op.count * op.bytes
            out[key]["flops"] += op.count * op.flops
            out[key]["launches"] += op.count * op.launches
    return out


# --------------------------------------------------------------------------- memory


def saved_activations(build: str, s: Shape, float32_softmax: bool = True, recompute: str = "none") -> dict[str, float]:
    """Bytes each op group keeps from the forward for the backward (tensors shared by two ops once).

    The bfloat16 copies of the weights that autocast makes and the GEMMs keep count here too; the
    token ids, which exist before the step, do not. ``recompute`` (fastgpt's build only,
    :data:`fastgpt.model.RECOMPUTE`): what a recomputed part saves is nothing, and its input, the
    float32 residual stream, is kept instead (counted under layer norm, whose input it is).
    """
    if recompute != "none":
        if build != "fastgpt":
            raise ValueError(f"recompute is fastgpt's: got {recompute!r} for the {build} build")
        return _recomputed(saved_activations(build, s, float32_softmax), s, recompute)
    n, c, h, v, t, L = s.tokens, s.n_embd, s.hidden, s.vocab_size, s.seq_len, s.n_layer
    # every LayerNorm keeps its float32 input (the residual stream) and its statistics
    saved = {"layer norm": (2 * L + 1) * (n * c + 2 * n) * F32}
    if build == "naive":
        heads = L * s.n_head
        scores = s.batch * t * t
        saved["attention linears"] = heads * 3 * (n * c + s.head_dim * c) * LOW + L * (n * c + c * c) * LOW
        # q, k, v; the mask; the softmax's output (and its bfloat16 cast for the bmm under CUDA's autocast)
        softmax = scores * (F32 + LOW) if float32_softmax else scores * LOW
        saved["attention core"] = heads * (3 * n * s.head_dim * LOW + t * t * MASK + softmax)
        saved["MLP"] = L * ((n * c + h * c) * LOW + n * h * LOW + c * h * LOW)  # ReLU's output serves both
        saved["lm_head + loss"] = (n * c + v * c) * LOW + n * v * F32
        return saved
    saved["attention linears"] = L * (n * c + 3 * c * c + c * c) * LOW  # c_attn's input, both weights
    saved["attention core"] = L * ((3 * n * c + n * c) * LOW + _lse_bytes(s))  # q, k, v (c_attn's output), y, lse
    if build == "plain":
        saved["MLP"] = L * (n * c + h * c + 2 * n * h + c * h) * LOW  # input, W1, GELU's input and output, W2
        saved["lm_head + loss"] = (n * c + v * c) * LOW + n * v * F32  # x and W in bfloat16, log-probabilities
    else:
        saved["MLP"] = L * (n * c + h * c + n * h + c * h) * LOW  # input, W1, pre, W2
        saved["lm_head + loss"] = (n * c + v * c) * LOW  # the gradients the forward computed
    return saved


def _recomputed(saved: dict[str, float], s: Shape, recompute: str) -> dict[str, float]:
    """``saved`` (nothing recomputed) with what a recomputed MLP branch (ln_2 and the MLP) or block
    keeps instead: its input, which is the input of its first LayerNorm, and no statistics."""
    n, c, L = s.tokens, s.n_embd, s.n_layer
    out = dict(saved)
    if recompute == "mlp":
        out["layer norm"] -= L * 2 * n * F32  # ln_2 keeps its input as the checkpoint's, not its statistics
        out["MLP"] = 0.0
    elif recompute == "block":
        out["layer norm"] = (n * c + 2 * n) * F32 + L * n * c * F32  # ln_f's; each block's input
        for group in ("attention linears", "attention core", "MLP"):
            out[group] = 0.0
    else:
        raise ValueError(f"unknown recompute {recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    return out


def recompute_transient(s: Shape, recompute: str) -> float:
    """What one layer's recomputed part holds during its backward: its saved activations."""
    if recompute == "none":
        return 0.0
    full, kept = saved_activations("fastgpt", s), saved_activations("fastgpt", s, recompute=recompute)
    return sum(full[g] - kept[g] for g in full) / s.n_layer


def loss_transient(build: str, s: Shape) -> float:
    """The largest memory that exists only around the loss, beyond what is saved.

    Unfused: the log-softmax's backward, with the nll_loss's gradient and its own, float32 (N, V)
    each (the forward holds less: bfloat16 logits and their float32 copy). Fused: in the forward,
    the bfloat16 x and W, the float32 dW accumulator and dx, then the larger of a chunk's dz with
    its (max, sum) slots and dW's bfloat16 copy; its backward holds less.
    """
    n, c, v = s.tokens, s.n_embd, s.vocab_size
    if build != "fastgpt":
        return 2 * n * v * F32
    _, rows = loss_chunks(s)
    chunk = rows * v * LOW + rows * (2 * math.ceil(v / LOSS_SLOT_COLUMNS) + 1) * F32
    return (n * c + v * c) * LOW + v * c * F32 + n * c * LOW + max(chunk, v * c * LOW)


def memory(build: str, s: Shape, float32_softmax: bool = True, recompute: str = "none") -> dict[str, float]:
    """Where a step's memory goes, in bytes: the state (parameters, AdamW's moments, buffers; the
    gradients are counted in the step), saved activations per group, the loss's transient, and the
    modelled peak of a step beyond the state (what :func:`bench.measure.peak_memory` measures) and in
    all. With ``recompute``, the peak may instead come where a layer's recomputed activations join
    what is saved (:func:`recompute_transient`)."""
    p = parameters(build, s) * F32
    buffers = s.n_layer * s.n_head * s.seq_len**2 * F32 if build == "naive" else 0  # each head's tril
    saved = saved_activations(build, s, float32_softmax, recompute)
    transient = loss_transient(build, s)
    # The backward's end: every gradient, and the wte's second gradient with the sum of the two.
    backward_end = p + 2 * s.vocab_size * s.n_embd * F32
    step = max(sum(saved.values()) + max(transient, recompute_transient(s, recompute)), backward_end)
    return {"parameters": p, "gradients": p, "AdamW state": 2 * p, "buffers": buffers,
            **{f"saved: {g}": b for g, b in saved.items()}, "loss transient": transient,
            "step peak beyond the state": step, "peak": p + 2 * p + buffers + step}


# --------------------------------------------------------------------------- the batch that fits


FIT_GPU_BYTES = 80e9  # an 80 GB GPU (H100)
FIT_USABLE = 0.9  # of it for tensors: the rest for the CUDA context, the allocator's fragmentation, NCCL
FIT_PRESETS = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m")


def largest_micro_batch(s: Shape, recompute: str, capacity: float = FIT_GPU_BYTES * FIT_USABLE) -> int:
    """The largest batch at ``s``'s other dimensions whose modelled peak (fastgpt's build, with
    ``recompute``) fits in ``capacity`` bytes; 0 if not even one sequence does."""
    fits = lambda batch: memory("fastgpt", dataclasses.replace(s, batch=batch), recompute=recompute)["peak"] <= capacity
    low, high = 0, 1
    while fits(high):  # the peak grows with the batch: double, then bisect
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def micro_batches(seq_len: int = 1024) -> dict[str, dict[str, int]]:
    """Per GPT-2 size (the ``--preset`` of :data:`FIT_PRESETS`) and recompute setting, the largest
    micro-batch of ``seq_len`` tokens that fits an 80 GB GPU in the model."""
    vocab = GPTConfig().vocab_size
    out = {}
    for name in FIT_PRESETS:
        preset = training.PRESETS[name]
        s = Shape(1, seq_len, preset["n_layer"], preset["n_head"], preset["n_embd"], vocab)
        out[name] = {mode: largest_micro_batch(s, mode) for mode in RECOMPUTE}
    return out


# --------------------------------------------------------------------------- the report


def project(s: Shape | None = None) -> dict:
    """The model at shape ``s`` (default GPT-2 124M, B=16, T=1024): per build and GPU the group
    totals, tokens/s and MFU; per build the memory; and fastgpt's ratios to the others."""
    s = s or Shape.gpt2()
    with torch.device("meta"):  # the shapes, without the weights
        model = GPT(GPTConfig(block_size=s.seq_len, vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head,
                              n_embd=s.n_embd))
    needed = train_step.needed_flops_per_token(model, s.seq_len)  # every build is rated with GPT-2's
    out = {"shape": dataclasses.asdict(s), "assumptions": {
        "tensor_core_efficiency": TENSOR_CORE_EFFICIENCY, "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
        "launch_seconds": LAUNCH_SECONDS}, "builds": {}}
    for build in BUILDS:
        step = ops(build, s)
        per_gpu = {}
        for name in MODEL_GPUS:
            gpu = perf.gpu_named(name)
            groups = totals(step, gpu)
            tokens_per_s = s.tokens / groups["step"]["seconds"]
            per_gpu[name] = {"groups": groups, "tokens_per_s": tokens_per_s,
                             "mfu": needed * tokens_per_s / gpu.bf16_flops}
        out["builds"][build] = {"gpus": per_gpu, "memory": memory(build, s), "parameters": parameters(build, s)}
    out["micro_batches"] = micro_batches(s.seq_len)
    out["ratios"] = {
        other: {"speedup": {g: out["builds"]["fastgpt"]["gpus"][g]["tokens_per_s"]
                            / out["builds"][other]["gpus"][g]["tokens_per_s"] for g in MODEL_GPUS},
                "memory": out["builds"]["fastgpt"]["memory"]["peak"] / out["builds"][other]["memory"]["peak"]}
        for other in ("plain", "naive")}
    return out
