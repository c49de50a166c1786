"""bench.step_model: its byte and FLOP formulas against counts of the real code at small shapes,
its saved activations against what autograd saves, and the projections it is built to make.

Each build's training step runs on the CPU at :data:`SMALL` (two layers, bfloat16 autocast):
PyTorch's ops counted by :func:`fastgpt_kernels.tools.traffic.count_torch_traffic` (corrected where its
convention is not what a GPU moves: :class:`Uncounted`), fastgpt's Triton kernels in Triton's
interpreter by :func:`fastgpt_kernels.tools.traffic.count_memory_traffic`, one window per launch, distinct
bytes; GEMM FLOPs by ``FlopCounterMode``.
"""
import contextlib
import dataclasses
import importlib
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import fastgpt_kernels
from bench import step_model, train_step
from fastgpt import perf
from fastgpt_kernels import _dispatch, reference

needs_interpreter = pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts bytes in Triton's interpreter")

# Two layers, two heads of 32, 64 wide, 256 symbols, B=2, T=64; the fused loss in three chunks of
# at most 48 rows (a short last one), so that its per-chunk formulas are checked too.
SMALL = step_model.Shape(batch=2, seq_len=64, n_layer=2, n_head=2, n_embd=64, vocab_size=256)
SMALL_CHUNK_LOGITS = 48 * SMALL.vocab_size
KERNEL_MODULES = [f"fastgpt_kernels.ops.{op}" for op in _dispatch.OPS]


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Uncounted(TorchDispatchMode):
    """What :func:`count_torch_traffic` counts that a GPU does not move (``loaded``, ``stored``, to
    subtract; negative where it misses bytes a GPU moves), by its reason:

    - a view that aten does not mark as one (``_unsafe_view``), and allocation (``empty*``), move nothing;
    - a gather reads only what it gathers: an embedding's rows, nll_loss's target logits; nll_loss's
      backward and ``copy_`` use their ``self`` / destination for its shape only;
    - a tensor passed twice to one op (``addcmul_(g, g)``) is read once;
    - in-place ops that return nothing (foreach ops, fused AdamW) write the tensors they update;
    - fastgpt's kernel ops (``fastgpt::*``): their work is counted kernel by kernel instead.
    """

    ALLOCATIONS = ("aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
                   "aten.empty_strided.default")

    def __init__(self):
        super().__init__()
        self.loaded = 0
        self.stored = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name == "aten._unsafe_view.default" or name.startswith("fastgpt.") or name in self.ALLOCATIONS:
            self.loaded += sum(map(_nbytes, inputs))
            self.stored += sum(map(_nbytes, outputs))
        elif name == "aten.embedding.default":
            weight, indices = args[0], args[1]
            self.loaded += _nbytes(weight) - indices.numel() * weight.shape[1] * weight.element_size()
        elif name == "aten.nll_loss_forward.default":
            self.loaded += _nbytes(args[0]) - args[0].shape[0] * args[0].element_size()
        elif name in ("aten.nll_loss_backward.default", "aten.copy_.default"):
            self.loaded += _nbytes(args[1] if "nll" in name else args[0])
        else:
            seen, tensors = set(), tree_leaves((args, kwargs))
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                    self.loaded += _nbytes(t) if key in seen and t.numel() else 0
                    seen.add(key)
            if name.startswith("aten._foreach") and name.split(".")[1].endswith("_"):
                self.stored -= sum(map(_nbytes, args[0]))  # the list updated in place
            elif name.startswith("aten._fused_adamw_"):
                self.stored -= sum(_nbytes(t) for updated in (args[0], args[2], args[3]) for t in updated)
        return out


class Counts:
    """Bytes and FLOPs of one window: PyTorch ops (corrected), fastgpt's kernels per name, GEMM FLOPs."""

    def __init__(self):
        self.torch_loaded = self.torch_stored = 0
        self.kernels = defaultdict(lambda: [0, 0])  # kernel name -> [distinct loaded, distinct stored]
        self.flops = 0


@contextlib.contextmanager
def counting_kernels(counts_of):
    """Each Triton launch of fastgpt's kernel ops in its own counting window, added to ``counts_of()``'s
    kernels; launched with any dispatch mode switched off (the interpreter's staging copies are not the
    kernel's traffic)."""
    from fastgpt_kernels.tools.traffic import count_memory_traffic

    def run(plan):
        outputs, launches = plan
        for kernel, grid, args, meta in launches:
            with _disable_current_modes(), count_memory_traffic() as traffic:
                kernel[grid](*args, **meta)
            assert traffic.out_of_bounds == 0, kernel.__name__
            entry = counts_of().kernels[kernel.__name__]
            entry[0] += traffic.distinct_loaded
            entry[1] += traffic.distinct_stored
        return outputs

    with pytest.MonkeyPatch.context() as patch:
        for module in KERNEL_MODULES:
            patch.setattr(importlib.import_module(module), "run", run)
        yield


@contextlib.contextmanager
def window(counts: Counts):
    """Count the PyTorch ops of the block into ``counts`` (count_torch_traffic less :class:`Uncounted`)."""
    from fastgpt_kernels.tools.traffic import count_torch_traffic

    with count_torch_traffic() as traffic, Uncounted() as uncounted, FlopCounterMode(display=False) as flop_mode:
        yield
    counts.torch_loaded += traffic.loaded - uncounted.loaded
    counts.torch_stored += traffic.stored - uncounted.stored
    counts.flops += flop_mode.get_total_flops()


def run_step(build: str, s: step_model.Shape) -> dict[str, Counts]:
    """One training step of ``build`` at ``s`` after a warm-up step, counted per phase."""
    shape = dict(vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    cpu = torch.device("cpu")
    model, optimizer = train_step.build(build, shape, s.seq_len, 0.0, cpu)
    if build == "naive":  # PyTorch's default AdamW on a GPU is the foreach one (on a CPU, a loop)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    idx, targets = train_step.random_batch(shape, s.seq_len, s.batch, cpu)
    backend = "triton" if build == "fastgpt" else "torch"
    counts = {phase: Counts() for phase in step_model.PHASES}
    current = ["forward"]

    def step(count: bool):
        def counting(phase):
            return window(counts[phase]) if count else contextlib.nullcontext()

        with counting("forward"), fastgpt_kernels.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        current[0] = "backward"
        with counting("backward"):
            loss.backward()
        with counting("optimizer"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with counting_kernels(lambda: counts[current[0]]):
        step(count=False)
        for phase in step_model.PHASES:
            counts[phase] = Counts()
        current[0] = "forward"
        step(count=True)
    return counts


@contextlib.contextmanager
def small_chunks():
    """The fused loss in chunks of :data:`SMALL_CHUNK_LOGITS` logits: in the kernels and in the model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "MAX_CHUNK_LOGITS", SMALL_CHUNK_LOGITS)
        yield


@pytest.fixture(scope="module")
def counted():
    """Every build's step at :data:`SMALL`, counted once for the tests below."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only cost synchronisation
    try:
        with small_chunks():
            return {build: run_step(build, SMALL) for build in step_model.BUILDS}
    finally:
        torch.set_num_threads(previous)


def modelled(build: str, phase: str, where: str) -> list[step_model.Op]:
    """The model's ops of ``build`` at :data:`SMALL` (CPU autocast's softmax) in ``phase``, run ``where``."""
    with small_chunks():
        step = step_model.ops(build, SMALL, float32_softmax=False)
    return [op for op in step if op.phase == phase and op.where == where]


def assert_close(got, expected, what):
    tolerance = step_model.BYTES_TOLERANCE
    assert abs(got - expected) <= tolerance * max(abs(got), 1), f"{what}: counted {got}, modelled {expected}"


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("phase", step_model.PHASES)
@pytest.mark.parametrize("build", step_model.BUILDS)
def test_the_pytorch_ops_bytes_are_the_counted_ones(counted, build, phase):
    c = counted[build][phase]
    # fastgpt's kernel ops are called directly (not through torch.library's dispatch): the PyTorch
    # ops around their launches count with the step's.
    ops = modelled(build, phase, "torch") + modelled(build, phase, "kernel host")
    assert_close(c.torch_loaded, sum(op.count * op.reads for op in ops), f"{build} {phase} bytes read")
    assert_close(c.torch_stored, sum(op.count * op.writes for op in ops), f"{build} {phase} bytes written")


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("phase", ("forward", "backward"))
def test_fastgpts_kernels_move_the_modelled_bytes_kernel_by_kernel(counted, phase):
    kernel_counts = counted["fastgpt"][phase].kernels
    expected = defaultdict(lambda: [0, 0])
    for op in modelled("fastgpt", phase, "triton"):
        expected[op.name.split()[0]][0] += op.count * op.reads
        expected[op.name.split()[0]][1] += op.count * op.writes
    assert set(kernel_counts) == set(expected)
    for name, (reads, writes) in expected.items():
        assert_close(kernel_counts[name][0], reads, f"{name} ({phase}) bytes read")
        assert_close(kernel_counts[name][1], writes, f"{name} ({phase}) bytes written")


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("phase", ("forward", "backward"))
@pytest.mark.parametrize("build", step_model.BUILDS)
def test_the_gemm_flops_are_the_flop_counters(counted, build, phase):
    # FlopCounterMode counts PyTorch's matmuls (not its CPU flash attention, not fastgpt's kernel ops).
    ops = [op for op in modelled(build, phase, "torch") if not op.name.startswith("SDPA")]
    assert counted[build][phase].flops == sum(op.count * op.flops for op in ops)


@needs_interpreter
def test_the_fused_losss_host_side_pytorch_ops_are_the_modelled_ones():
    # Inside fastgpt's kernel op, hidden from the whole step's count: run its forward directly.
    from fastgpt_kernels.ops import linear_cross_entropy as lce

    n, c, v = SMALL.tokens, SMALL.n_embd, SMALL.vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=gen).bfloat16()
    weight = (torch.randn(v, c, generator=gen) * 0.02).bfloat16()
    targets = torch.randint(v, (n,), generator=gen)
    counts = Counts()
    with small_chunks(), counting_kernels(lambda: Counts()), window(counts):
        reference.linear_cross_entropy_forward(lce.TritonChunks, x, weight, None, targets, -1, "mean", True)
    ops = modelled("fastgpt", "forward", "kernel host")
    assert_close(counts.torch_loaded, sum(op.count * op.reads for op in ops), "bytes read")
    assert_close(counts.torch_stored, sum(op.count * op.writes for op in ops), "bytes written")


def test_the_launch_facts_the_formulas_use_are_the_kernels():
    if _dispatch.NO_TRITON_REASON:
        pytest.skip(_dispatch.NO_TRITON_REASON)
    from fastgpt_kernels.ops import _gemm, layer_norm, linear_cross_entropy

    assert step_model.LAYER_NORM_ROWS_PER_PROGRAM == layer_norm.MAX_ROWS_PER_PROGRAM
    assert step_model.LOSS_SLOT_COLUMNS == linear_cross_entropy.SLOT_N
    assert step_model.LOSS_TILE_COLUMNS == max(_gemm.CONFIGS, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
                                               * c.kwargs["BLOCK_K"]).kwargs["BLOCK_N"]
    # At GPT-2's 16384 rows the backward runs one program per 16 rows on an H100 or H200 (132 SMs) too.
    rows = step_model.Shape.gpt2().tokens
    assert layer_norm.backward_programs(rows, 768, 132) == rows // step_model.LAYER_NORM_ROWS_PER_PROGRAM
    # There the MLP's weight gradients run in two K slices and a reduction; at the tests' small shapes in one.
    names = [op.name for op in step_model.ops("fastgpt", step_model.Shape.gpt2()) if op.phase == "backward"]
    assert "_gelu_mlp_bwd_dweight_kernel dW1, db1, 2 K slices" in names
    assert "_gelu_mlp_bwd_split_reduce_kernel dW1, db1" in names
    assert _gemm.split_k(4 * 768, 768, rows, step_model.GPU_SMS) == 2
    assert _gemm.split_k(4 * SMALL.n_embd, SMALL.n_embd, SMALL.tokens, step_model.GPU_SMS) == 1


def saved_bytes(build: str, monkeypatch, recompute: str = "none") -> tuple[int, int]:
    """``(parameters, bytes of the tensors the forward keeps for the backward)`` of ``build``'s model
    at SMALL in bfloat16 autocast: what reaches a saved-tensor hook, and the inputs of the
    checkpoints of a recomputed model (inside torch.utils.checkpoint nothing reaches an outer hook)."""
    s = SMALL
    shape = dict(vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    cpu = torch.device("cpu")
    model, _ = train_step.build(build, shape, s.seq_len, 0.0, cpu)
    if recompute != "none":
        model.recompute = recompute
    idx, targets = train_step.random_batch(shape, s.seq_len, s.batch, cpu)
    before = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), idx, targets)}
    saved = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in before:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, x, **kw: (keep(x), real(fn, x, **kw))[1])
    backend = "triton" if build == "fastgpt" else "torch"
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), fastgpt_kernels.use_backend(backend), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, targets)
    return sum(p.numel() for p in model.parameters()), sum(saved.values())


@pytest.mark.parametrize("build", step_model.BUILDS)
def test_the_parameters_and_saved_activations_are_the_models(build, monkeypatch):
    if build == "fastgpt" and not _dispatch.INTERPRETED:
        pytest.skip("fastgpt's kernels keep other tensors than its fallback: they must run, in the interpreter")
    parameters, saved = saved_bytes(build, monkeypatch)
    assert parameters == step_model.parameters(build, SMALL)
    expected = sum(step_model.saved_activations(build, SMALL, float32_softmax=False).values())
    assert abs(saved - expected) <= 0.02 * expected  # all but a few scalars


@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_what_a_recomputed_model_saves_is_the_models(recompute, monkeypatch):
    if not _dispatch.INTERPRETED:
        pytest.skip("fastgpt's kernels keep other tensors than its fallback: they must run, in the interpreter")
    _, saved = saved_bytes("fastgpt", monkeypatch, recompute)
    expected = sum(step_model.saved_activations("fastgpt", SMALL, recompute=recompute).values())
    assert abs(saved - expected) <= 0.02 * expected
    kept = sum(step_model.saved_activations("fastgpt", SMALL).values())
    assert expected < (0.7 if recompute == "mlp" else 0.4) * kept


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    s = step_model.Shape.gpt2(1, 1024)
    capacity = 20 * 2**30
    for recompute in ("none", "mlp", "block"):
        batch = step_model.largest_micro_batch(s, recompute, capacity)
        peak = lambda b: step_model.memory("fastgpt", dataclasses.replace(s, batch=b), recompute=recompute)["peak"]
        assert batch >= 1 and peak(batch) <= capacity < peak(batch + 1)
    assert step_model.largest_micro_batch(s, "none", 1e9) == 0  # not even the state fits
    fits = step_model.micro_batches()
    assert list(fits) == ["gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"]
    for name, by_mode in fits.items():
        assert 0 < by_mode["none"] < by_mode["mlp"] < by_mode["block"], (name, by_mode)
    assert [by_mode["none"] for by_mode in fits.values()] == sorted((b["none"] for b in fits.values()), reverse=True)
    with pytest.raises(ValueError, match="recompute is fastgpt's"):
        step_model.saved_activations("plain", s, recompute="block")


def test_projections_for_gpt2_on_h100_and_h200():
    projection = step_model.project()
    assert projection["shape"] == dict(batch=16, seq_len=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    builds = projection["builds"]
    assert builds["plain"]["parameters"] == builds["fastgpt"]["parameters"] == 124_475_904
    assert step_model.loss_chunks(step_model.Shape.gpt2())[0] == 13  # 16384 rows, at most 2^26 logits a chunk
    for build in step_model.BUILDS:
        h100, h200 = (builds[build]["gpus"][g] for g in step_model.MODEL_GPUS)
        assert h200["tokens_per_s"] >= h100["tokens_per_s"]  # the same tensor-core peak, more bandwidth
        assert 0 < h100["mfu"] < step_model.TENSOR_CORE_EFFICIENCY
        groups = h100["groups"]
        assert sum(groups[g]["seconds"] for g in step_model.GROUPS) == pytest.approx(groups["step"]["seconds"])
        memory = builds[build]["memory"]
        assert memory["peak"] > memory["parameters"] + memory["gradients"] + memory["AdamW state"]
    # The (T, T) scores make the naive build the slowest and largest, and fastgpt never holds the logits.
    assert builds["naive"]["gpus"]["H100 SXM"]["tokens_per_s"] < builds["plain"]["gpus"]["H100 SXM"]["tokens_per_s"]
    assert projection["ratios"]["plain"]["memory"] < 1 and projection["ratios"]["naive"]["memory"] < 1
    assert builds["fastgpt"]["memory"]["loss transient"] < builds["plain"]["memory"]["loss transient"] / 10


def test_an_op_is_as_slow_as_its_slower_roof_plus_its_launches():
    gpu = perf.gpu_named("H100 SXM")
    flops = step_model.TENSOR_CORE_EFFICIENCY * gpu.bf16_flops * 1e-3  # 1 ms of tensor-core work
    membytes = step_model.BANDWIDTH_EFFICIENCY * gpu.bandwidth * 2e-3  # 2 ms of bandwidth
    op = step_model.Op("x", "MLP", "forward", "torch", membytes / 2, membytes / 2, flops, launches=2, count=3)
    assert step_model.op_seconds(op, gpu) == pytest.approx(3 * (2e-3 + 2 * step_model.LAUNCH_SECONDS))
    with pytest.raises(ValueError, match="unknown build 'other'"):
        step_model.ops("other", SMALL)

