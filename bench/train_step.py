"""End to end: training steps of fastgpt's GPT against the naive lecture model and plain PyTorch.

A step is what a training loop does per batch: forward with the loss, backward, AdamW step, zero
the gradients. Three sides, all with the lecture's shape (6 layers, 6 heads of 64, 384 wide, 65
symbols) at each context length (:func:`run`): the naive lecture model (:mod:`bench.naive`), the
same GPT-2 architecture in plain PyTorch (:mod:`bench.plain`: SDPA, ``F.layer_norm``, linear + GELU
+ linear, logits + ``F.cross_entropy``), and fastgpt's GPT, which runs through :mod:`fastgpt_kernels`
under ``auto`` on a GPU (per op and shape class the faster of its Triton kernel and PyTorch's op,
raced on the first step; a row's ``backend`` names the side that served each op) and the PyTorch
references on a CPU (the ``torch`` backend). Dropout is off on every side
unless asked for, so that they do the same arithmetic; the lecture's own runs used 0.2.

Each side is timed in float32 and in the low precision's autocast, all variants of one context
length interleaved round by round (:func:`bench.measure.interleaved_times`). A side's *default*
precision is what it trains in out of the box: float32 for the lecture's code, and for fastgpt
what ``--dtype auto`` picks on this machine (:func:`fastgpt.device.resolve_dtype`); plain PyTorch
is compared with fastgpt at the same precision only.

GPT-2 124M (:func:`run_gpt2`): :class:`fastgpt.model.GPTConfig`'s defaults at T=1024 in the low
precision's autocast (bfloat16 on a CPU), peak memory and tokens/s of a step per variant
(:data:`GPT2_VARIANTS`): plain PyTorch (:mod:`bench.plain`, logits then ``F.cross_entropy``);
fastgpt's GPT with the same unfused loss (``model(idx, targets, return_logits=True)``); with its
fused loss (``model(idx, targets)``, which never holds the (B, T, V) logits); and the fused loss
with each :attr:`fastgpt.model.GPT.recompute` setting.
"""
from __future__ import annotations

import time

import torch

import fastgpt_kernels
from bench import measure
from bench.naive import NaiveConfig, NaiveGPT
from bench.plain import PlainGPT
from fastgpt import perf
from fastgpt.model import GPT, GPTConfig
from fastgpt.device import autocast_context, resolve_dtype
from fastgpt.perf import peak_flops

SIDES = ("naive", "plain", "fastgpt")
BASELINES = ("naive", "plain")  # the sides fastgpt is compared with
PRECISIONS = ("float32", "bfloat16", "float16")
LECTURE_SHAPE = dict(vocab_size=65, n_layer=6, n_head=6, n_embd=384)
TINY_SHAPE = dict(vocab_size=65, n_layer=2, n_head=2, n_embd=32)
# GPT-2 small (124M): GPTConfig's defaults.
GPT2_SHAPE = {name: getattr(GPTConfig(), name) for name in ("vocab_size", "n_layer", "n_head", "n_embd")}

# (context length, batch size) per run size: about 2048 tokens a step at every length on a CPU.
CONTEXTS = {
    "tiny": [(16, 2), (32, 1)],
    "quick": [(256, 8), (1024, 2)],
    "full": [(256, 8), (1024, 2), (2048, 1)],
}

# GPT-2 124M's step per variant, at T=1024 and these batch sizes (tiny: the tiny shape at T=32). On
# the 2-core CPU these figures come from, an unfused step needs about 1 GiB more per sequence (1.2,
# 2.2, 4.2 GiB at B=1, 2, 4): B=4 is the largest power of two within a budget of 6 GiB beyond the
# models and their AdamW state (1.5 GiB each) on a machine of 23 GiB shared with other jobs. A step
# takes 4 to 25 s there, so at most two timed rounds.
# variant -> (side, return_logits: the unfused loss, recompute); the first is the baseline.
GPT2_VARIANTS = {
    "plain": ("plain", False, "none"),
    "unfused": ("fastgpt", True, "none"),
    "fused": ("fastgpt", False, "none"),
    "fused+mlp": ("fastgpt", False, "mlp"),
    "fused+block": ("fastgpt", False, "block"),
}
# (variant, baseline) pairs whose speed-up and memory ratio are reported.
GPT2_PAIRS = [(variant, "plain") for variant in list(GPT2_VARIANTS)[1:]] + [("fused", "unfused")]
GPT2_CONTEXT = {"tiny": 32, "quick": 1024, "full": 1024}
GPT2_BATCHES = {"tiny": (1, 2), "quick": (4,), "full": (1, 2, 4)}
GPT2_MAX_ROUNDS = 2


def precisions(device: torch.device) -> list[str]:
    """The precisions timed on ``device``: float32, and bfloat16 autocast where the device has it
    (CPUs, and GPUs from Ampere on), else float16 autocast."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["float32", "float16"]
    return ["float32", "bfloat16"]


def default_precisions(device: torch.device) -> dict[str, str]:
    """The out-of-the-box precision on ``device`` of the naive side and of fastgpt (plain PyTorch has none)."""
    return {"naive": "float32", "fastgpt": resolve_dtype("auto", device)}


def build(side: str, shape: dict, context: int, dropout: float, device: torch.device, seed: int = 0):
    """``(model, optimizer)`` of ``side`` (one of :data:`SIDES`) with ``shape``, in training mode."""
    torch.manual_seed(seed)
    if side == "naive":
        model = NaiveGPT(NaiveConfig(block_size=context, dropout=dropout, **shape)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # as in the lecture
    elif side in ("plain", "fastgpt"):
        model_class = PlainGPT if side == "plain" else GPT
        model = model_class(GPTConfig(block_size=context, dropout=dropout, bias=True, **shape)).to(device)
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device.type)
    else:
        raise ValueError(f"unknown side {side!r}: expected one of {', '.join(SIDES)}")
    return model.train(), optimizer


def needed_flops_per_token(model, context: int) -> int:
    """Training FLOPs a causal model of this shape needs per token, for MFU
    (:func:`fastgpt.perf.training_flops_per_token`, as in training): every side is rated with this
    one formula, whatever it executes."""
    cfg = model.config
    return perf.training_flops_per_token(perf.linear_weights(model), cfg.n_layer, cfg.n_embd, context)


def fastgpt_backend(device: torch.device) -> str:
    """The kernels' backend fastgpt is timed with: ``auto`` on a GPU, the references on a CPU."""
    return "auto" if device.type == "cuda" else "torch"


def served(decisions) -> str:
    """Which side served each op, from ``auto``'s decisions (:func:`fastgpt_kernels.backend_decisions`):
    ``"auto: kernel serves attention, gelu_mlp; PyTorch serves layer_norm"`` (an op whose shape
    classes went both ways is named under both)."""
    sides = {"kernel": sorted({d.op for d in decisions if d.served == "kernel"}),
             "PyTorch": sorted({d.op for d in decisions if d.served == "torch"})}
    return "auto: " + "; ".join(f"{side} serves {', '.join(ops)}" for side, ops in sides.items() if ops)


def step_fn(side: str, model, optimizer, idx, targets, precision: str, device: torch.device,
            backend: str | None = None, return_logits: bool = False):
    """A callable running one training step (forward, backward, AdamW, zero_grad).

    ``backend`` is the kernels' backend fastgpt's model runs under (default
    :func:`fastgpt_backend`); the naive and plain models always run PyTorch's own ops.
    ``return_logits`` makes fastgpt's model form the (B, T, V) logits and take ``F.cross_entropy``
    of them instead of its fused loss.
    """
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    if side != "fastgpt":
        backend = "torch"
    elif backend is None:
        backend = fastgpt_backend(device)

    kwargs = {"return_logits": True} if return_logits else {}

    def step():
        with fastgpt_kernels.use_backend(backend), autocast_context(device, precision):
            _, loss = model(idx, targets, **kwargs)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step, tokens: int, device: torch.device, steps: int, warmup: int = 1) -> dict:
    """Time the training step ``step()`` of a fresh model, from its very first call.

    Returns the first call's wall time (``first_step_s``: with the Triton kernels it includes
    compiling them and autotuning their configs for these shapes, unless this process did so
    before), the seconds of each of ``steps`` calls after ``warmup`` more untimed ones (``times_s``;
    CUDA events on a GPU, see :func:`bench.measure.time_call`), their median (``time_s``),
    ``tokens_per_s`` at ``tokens`` tokens a step, and the peak memory of one more step
    (:func:`bench.measure.peak_memory`).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    measure.synchronize(device)
    start = time.perf_counter()
    step()
    measure.synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = [measure.time_call(step, device) for _ in range(steps)]
    seconds = measure.median(times)
    return {"first_step_s": first, "times_s": times, "time_s": seconds, "tokens_per_s": tokens / seconds,
            "peak_memory_bytes": measure.peak_memory(step, device)}


def random_batch(shape: dict, context: int, batch: int, device: torch.device):
    """``(idx, targets)``, (batch, context) token ids from a private generator (the speed does not depend on them)."""
    gen = torch.Generator().manual_seed(context)
    idx = torch.randint(shape["vocab_size"], (batch, context), generator=gen)
    targets = torch.randint(shape["vocab_size"], (batch, context), generator=gen)
    return idx.to(device), targets.to(device)


def run(size: str, device: torch.device, rounds: int, dropout: float = 0.0, log=print) -> list[dict]:
    """Time every (side, precision) at every context length of ``size``; one row per variant.

    Rows hold tokens/s (median over ``rounds``), MFU (:func:`needed_flops_per_token`) against the
    machine's peak for that precision, peak memory of one step, and whether the precision is the
    side's default (:func:`default_precisions`).
    """
    shape = TINY_SHAPE if size == "tiny" else LECTURE_SHAPE
    defaults = default_precisions(device)
    timed = precisions(device)
    peaks = {p: peak_flops(device, p) for p in timed}
    rows = []
    for context, batch in CONTEXTS[size]:
        idx, targets = random_batch(shape, context, batch, device)
        steps, flops_per_token = {}, {}
        for side in SIDES:
            model, optimizer = build(side, shape, context, dropout, device)
            flops_per_token[side] = needed_flops_per_token(model, context)
            for precision in timed:
                steps[side, precision] = step_fn(side, model, optimizer, idx, targets, precision, device)
        log(f"  train step T={context} B={batch}: {len(steps)} variants, {rounds} rounds")
        decided = len(fastgpt_kernels.backend_decisions())
        times = measure.interleaved_times(steps, device, rounds)
        backend = fastgpt_backend(device)
        if backend == "auto":
            backend = served(fastgpt_kernels.backend_decisions()[decided:])
        for (side, precision), step in steps.items():
            seconds = measure.median(times[side, precision])
            tokens_per_s = batch * context / seconds
            rows.append({
                "side": side, "precision": precision, "default": defaults.get(side) == precision,
                "context": context, "batch": batch, "dropout": dropout, "time_s": seconds,
                "times_s": times[side, precision],
                "tokens_per_s": tokens_per_s, "mfu": flops_per_token[side] * tokens_per_s / peaks[precision],
                "peak_memory_bytes": measure.peak_memory(step, device),
                "backend": backend if side == "fastgpt" else "torch (PyTorch's own ops)",
            })
        del steps
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """fastgpt against each baseline side per context: speed-up and peak-memory ratio, at the same
    precision, and against the naive side also default against default.

    The speed-up is the median over rounds of the paired ratio baseline time / fastgpt time, each
    pair timed in the same round (so drifts of the machine's speed cancel), with its range over
    rounds; the memory ratio is fastgpt's peak over the baseline's.
    """
    by = {(r["context"], r["side"], r["precision"]): r for r in rows}
    default = {r["side"]: r["precision"] for r in rows if r["default"]}
    out = []
    for context in sorted({r["context"] for r in rows}):
        for baseline in BASELINES:
            pairs = [("defaults", default["fastgpt"], default[baseline])] if baseline in default else []
            pairs += [("same precision", p, p) for p in PRECISIONS if (context, "fastgpt", p) in by]
            for compared, fast_precision, base_precision in pairs:
                fast, base = by[context, "fastgpt", fast_precision], by[context, baseline, base_precision]
                out.append({"context": context, "baseline": baseline, "compared": compared,
                            "fastgpt": fast_precision, "baseline_precision": base_precision,
                            **paired_ratios(base, fast)})
    return out


def paired_ratios(base: dict, fast: dict) -> dict:
    """Speed-up of ``fast`` over ``base`` (median and range over rounds of the paired time ratios)
    and the ratio of their peak memories (None when either is unknown)."""
    paired = [b / f for b, f in zip(base["times_s"], fast["times_s"])]
    memory = (fast["peak_memory_bytes"] / base["peak_memory_bytes"]
              if fast["peak_memory_bytes"] and base["peak_memory_bytes"] else None)
    return {"speedup": measure.median(paired), "speedup_min": min(paired), "speedup_max": max(paired),
            "memory_ratio": memory}


def run_gpt2(size: str, device: torch.device, rounds: int, log=print) -> list[dict]:
    """GPT-2 124M's training step in every variant of :data:`GPT2_VARIANTS`, per batch of
    :data:`GPT2_BATCHES` (one row per batch and variant): tokens/s (median of ``rounds``, at most
    :data:`GPT2_MAX_ROUNDS`, the variants interleaved) and peak memory of a step.

    Plain PyTorch has its model and optimizer; fastgpt's variants share one model and optimizer, so
    they differ only by the loss and what is recomputed. The tiny size uses the tiny shape. fastgpt's
    kernels run as in :func:`run` (:func:`fastgpt_backend`).
    """
    shape = TINY_SHAPE if size == "tiny" else GPT2_SHAPE
    context, rounds = GPT2_CONTEXT[size], min(rounds, GPT2_MAX_ROUNDS)
    precision = precisions(device)[-1]
    models = {side: build(side, shape, context, 0.0, device) for side in ("plain", "fastgpt")}
    rows = []
    for batch in GPT2_BATCHES[size]:
        idx, targets = random_batch(shape, context, batch, device)
        steps = {variant: _gpt2_step(models[side], side, unfused, recompute, idx, targets, precision, device)
                 for variant, (side, unfused, recompute) in GPT2_VARIANTS.items()}
        log(f"  GPT-2 step T={context} B={batch}: {', '.join(steps)}, {rounds} round(s)")
        times = measure.interleaved_times(steps, device, rounds)
        for variant, step in steps.items():
            seconds = measure.median(times[variant])
            rows.append({"variant": variant, "context": context, "batch": batch, "precision": precision,
                         "backend": fastgpt_backend(device) if GPT2_VARIANTS[variant][0] == "fastgpt" else "torch",
                         "recompute": GPT2_VARIANTS[variant][2], "time_s": seconds, "times_s": times[variant],
                         "tokens_per_s": batch * context / seconds,
                         "peak_memory_bytes": measure.peak_memory(step, device)})
    return rows


def _gpt2_step(built, side: str, unfused: bool, recompute: str, idx, targets, precision: str, device: torch.device):
    """One variant's training step: :func:`step_fn`, with fastgpt's model set to ``recompute`` first."""
    model, optimizer = built
    step = step_fn(side, model, optimizer, idx, targets, precision, device, return_logits=unfused)
    if side != "fastgpt":
        return step

    def recomputing():
        model.recompute = recompute
        step()

    return recomputing


def gpt2_ratios(rows: list[dict]) -> list[dict]:
    """Per batch and pair of :data:`GPT2_PAIRS`, the variant against its baseline (:func:`paired_ratios`)."""
    by = {(r["batch"], r["variant"]): r for r in rows}
    return [{"batch": batch, "context": by[batch, variant]["context"], "variant": variant, "baseline": baseline,
             **paired_ratios(by[batch, baseline], by[batch, variant])}
            for batch in sorted({r["batch"] for r in rows}) for variant, baseline in GPT2_PAIRS]


def profile(size: str, device: torch.device, precision: str, dropout: float = 0.0, top: int = 12) -> dict[str, str]:
    """Where a training step's time goes: torch.profiler's ``top`` ops by self time, per side.

    Two steps of each side in ``precision`` at the first context length of ``size``, after one
    warm-up step; returns the profiler's table per side.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    shape = TINY_SHAPE if size == "tiny" else LECTURE_SHAPE
    context, batch = CONTEXTS[size][0]
    idx, targets = random_batch(shape, context, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for side in SIDES:
        model, optimizer = build(side, shape, context, dropout, device)
        step = step_fn(side, model, optimizer, idx, targets, precision, device)
        step()
        with torch_profile(activities=activities) as prof:
            step()
            step()
            measure.synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[side] = prof.key_averages().table(sort_by=sort, row_limit=top)
    return tables
