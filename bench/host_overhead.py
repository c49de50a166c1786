"""``python -m bench.host_overhead``: what each op costs the CPU on the Triton path, apart from its kernels.

A GPU runs a kernel while the CPU prepares the next launch; where the CPU takes longer than the GPU,
the GPU waits. This measures the CPU's part per call of every public op, forward and backward, on
this machine: validation, dispatch, the ``torch.library`` custom-op and autograd layers, the launch
plans, and the autotuner's key and cache lookup (the path a GPU takes on every call after its
first). It runs the ops on CPU tensors in Triton's interpreter with every kernel launch replaced by a
stub that returns at once, so it leaves out the kernels and Triton's own launcher (argument
binding and the driver's launch), which only a GPU runs: ``python -m bench.gpu_report`` times a
bare launch there.

Each op is timed in turns with its floor: a do-nothing ``torch.autograd.Function`` with the same
inputs and output (:class:`_Bare`), what PyTorch charges any op written in Python: the part of
the host path no implementation of the op in Python can remove.

Beside it: the ``torch`` backend's cost over calling the PyTorch op it runs directly (the same op,
one layer of validation and dispatch more), and the kernel launches of one GPT-2 124M training step (forward
and backward), counted with the stubbed launches.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from fastgpt_kernels import _processes

REPEATS = {"tiny": 20, "full": 300}
# Targets: each op's host path (launches excluded) and the torch backend's cost over the PyTorch op.
HOST_TARGET_US = 10.0
TORCH_BACKEND_TARGET_US = 5.0


def _per_call(*fns, repeats: int, rounds: int = 7) -> list[float]:
    """Seconds per call of each of ``fns``: the median over ``rounds`` of ``repeats`` calls each,
    after a warm-up, the functions taking turns round by round (so a slow spell of the machine
    falls on all of them alike)."""
    for fn in fns:
        for _ in range(3):
            fn()
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, samples):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times.append((time.perf_counter() - start) / repeats)
    return [statistics.median(times) for times in samples]


class _Bare(torch.autograd.Function):
    """The floor of any op written as a Python ``torch.autograd.Function``: the forward is the
    Function's apply and one output allocated; the backward, the autograd engine's visit of the node
    returning gradients made beforehand. No validation, no dispatch, no launches."""

    @staticmethod
    def forward(ctx, like, grads, *inputs):
        ctx.grads = grads
        return torch.empty_like(like)

    @staticmethod
    def backward(ctx, dy):
        return None, None, *ctx.grads


@contextlib.contextmanager
def stubbed_launches():
    """Every interpreted kernel launch returns at once; yields a list that counts the launches, and
    takes the autotuner's path with its choices made once (all configs timed equal)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastgpt_kernels import _dispatch, _tuning

    launches = []
    originals = InterpretedFunction.run, _tuning._autotuner_can_time, _tuning.cache_file
    computes_bf16 = _dispatch.interpreter_computes_bf16
    _dispatch.interpreter_computes_bf16 = True  # nothing is computed: bfloat16's bit patterns do no harm
    InterpretedFunction.run = lambda self, *args, **kwargs: launches.append(self)
    _tuning._autotuner_can_time = lambda: True
    _tuning.cache_file = lambda: None  # these made-up choices are never kept on disk
    chosen = {}
    for name, tunable in _tuning.tunables().items():
        tunable.tuner._bench = lambda *args, config, **meta: [1.0, 1.0, 1.0]
        chosen[name], tunable.chosen = tunable.chosen, {}
    try:
        yield launches
    finally:
        InterpretedFunction.run, _tuning._autotuner_can_time, _tuning.cache_file = originals
        _dispatch.interpreter_computes_bf16 = computes_bf16
        for name, tunable in _tuning.tunables().items():
            del tunable.tuner._bench  # the instance attribute set above: the class's method shows again
            tunable.chosen = chosen[name]


def _dispatched_arguments(call) -> tuple:
    """The arguments ``call`` (a public op) hands the dispatcher: what the op's PyTorch reference takes."""
    from fastgpt_kernels import _dispatch

    seen, original = [], _dispatch.call
    _dispatch.call = lambda op, *args: seen.append(args) or original(op, *args)
    try:
        call()
    finally:
        _dispatch.call = original
    return seen[0]


def op_calls(tokens: int, vocab: int = 128, width: int = 768, heads: int = 12, device="cpu") -> dict:
    """Per op of the registry: ``(kernels call, the PyTorch op the torch backend runs, inputs)`` at
    GPT-2 124M's widths (or ``width`` and ``heads``) over ``tokens`` tokens (each declaration's
    ``step_dims``; bfloat16, as in training under autocast). The vocabulary is smaller than GPT-2's by
    default: on a CPU, zeroing and copying its 77 MB weight gradient would be counted as host time,
    where a GPU runs it as a kernel."""
    import fastgpt_kernels
    from fastgpt_kernels import reference, registry

    calls = {}
    for declared in registry.declarations():
        inputs = declared.bench_inputs(declared.step_dims(tokens, width, heads, vocab), torch.bfloat16, device)
        call = functools.partial(getattr(fastgpt_kernels, declared.NAME), **inputs)
        direct = functools.partial(getattr(reference, declared.NAME), *_dispatched_arguments(call))
        calls[declared.NAME] = (call, direct, tuple(t for t in inputs.values() if t.requires_grad))
    return calls


def host_costs(tokens: int, repeats: int) -> list[dict]:
    """Per op and direction: the Triton path's CPU cost per call (launches stubbed), its launches,
    and beside it the floor (:class:`_Bare`) with the same inputs and output, timed in turns."""
    import fastgpt_kernels

    rows = []
    with stubbed_launches() as launches, fastgpt_kernels.use_backend("triton"):
        for op, (call, _, inputs) in op_calls(tokens).items():
            out = call()
            dy = torch.ones_like(out)
            grads = tuple(torch.empty_like(t) for t in inputs)
            bare_out = _Bare.apply(out, grads, *inputs)

            def backward():
                return torch.autograd.grad(out, inputs, dy, retain_graph=True)

            def bare_forward():
                return _Bare.apply(out, grads, *inputs)

            def bare_backward():
                return torch.autograd.grad(bare_out, inputs, dy, retain_graph=True)

            for direction, fn, bare in (("forward", call, bare_forward), ("backward", backward, bare_backward)):
                launches.clear()
                fn()
                per_call_launches = len(launches)
                seconds, floor = _per_call(fn, bare, repeats=repeats)
                rows.append({"op": op, "direction": direction, "tokens": tokens, "launches": per_call_launches,
                             "host_us": seconds * 1e6,
                             "host_us_per_launch": seconds * 1e6 / max(per_call_launches, 1),
                             "floor_us": floor * 1e6, "beyond_floor_us": (seconds - floor) * 1e6})
    return rows


def torch_backend_costs(repeats: int) -> list[dict]:
    """Per op: ``fastgpt_kernels.<op>`` on the torch backend against calling the PyTorch op it runs directly,
    timed in turns, on tiny tensors (2 tokens, width 16, 2 heads: the call, not the arithmetic, is
    what takes the time)."""
    import fastgpt_kernels

    rows = []
    with fastgpt_kernels.use_backend("torch"), torch.no_grad():
        for op, (call, direct, _) in op_calls(2, width=16, heads=2).items():
            ours, theirs = _per_call(call, direct, repeats=repeats)
            rows.append({"op": op, "kernels_us": ours * 1e6, "pytorch_us": theirs * 1e6,
                         "overhead_us": (ours - theirs) * 1e6})
    return rows


def step_launches(batch: int, seq_len: int, config=None) -> dict:
    """Kernel launches of one training step (forward and backward) of GPT-2 124M (or ``config``),
    counted with every launch stubbed (nothing is computed by the kernels)."""
    import fastgpt_kernels
    from fastgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(config or GPTConfig())
    idx = torch.randint(model.config.vocab_size, (batch, seq_len))
    with stubbed_launches() as launches, fastgpt_kernels.use_backend("triton"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
        forward = len(launches)
        loss.backward()
    by_kernel = {}
    for fn in launches:
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", repr(fn))
        by_kernel[name] = by_kernel.get(name, 0) + 1
    return {"batch": batch, "seq_len": seq_len, "forward": forward, "backward": len(launches) - forward,
            "total": len(launches), "by_kernel": by_kernel}


def run(size: str) -> dict:
    """Every figure of this benchmark: the host costs, the torch backend's overhead, the step's launches."""
    from fastgpt_kernels import _dispatch

    if not _dispatch.INTERPRETED:
        raise RuntimeError("the host overhead is measured in Triton's interpreter: run it with TRITON_INTERPRET=1 "
                           "(python -m bench does)")
    repeats = REPEATS[size]
    tiny = size == "tiny"
    torch.set_num_threads(1)  # the host path is one thread's work; more only add synchronisation
    from fastgpt.model import GPTConfig

    config = GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=100) if tiny else GPTConfig()
    return {"host": host_costs(128, repeats), "torch_backend": torch_backend_costs(repeats),
            "step_launches": step_launches(1 if tiny else 16, 64 if tiny else 1024, config)}


def in_child(size: str) -> dict:
    """:func:`run` in a child process with Triton's interpreter on (as ``python -m bench`` needs)."""
    env = {"OPENBLAS_NUM_THREADS": "1", **os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--size", size, "--json"], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the host-overhead benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def table(results: dict) -> list[str]:
    """The figures as text tables."""
    lines = [f"{'op':<21} {'direction':<9} {'launches':>8} {'host us/call':>12} {'us/launch':>9} "
             f"{'floor us':>8} {'beyond floor':>12}"]
    for r in results["host"]:
        lines.append(f"{r['op']:<21} {r['direction']:<9} {r['launches']:>8} {r['host_us']:>12.1f} "
                     f"{r['host_us_per_launch']:>9.1f} {r['floor_us']:>8.1f} {r['beyond_floor_us']:>12.1f}")
    lines.append("(floor: a do-nothing torch.autograd.Function with the op's inputs and output, timed in turns "
                 "with the op: the forward's apply, the backward's visit by the autograd engine)")
    lines += ["", f"{'op':<21} {'kernels (torch backend) us':>26} {'PyTorch op us':>13} {'overhead us':>11}"]
    for r in results["torch_backend"]:
        lines.append(f"{r['op']:<21} {r['kernels_us']:>26.1f} {r['pytorch_us']:>13.1f} {r['overhead_us']:>11.1f}")
    s = results["step_launches"]
    lines += ["", f"kernel launches of one training step (B={s['batch']}, T={s['seq_len']}): {s['forward']} forward + "
                  f"{s['backward']} backward = {s['total']}",
              "  " + ", ".join(f"{name} {n}" for name, n in sorted(s["by_kernel"].items()))]
    return lines


def target_lines(results: dict) -> list[str]:
    """Whether each op and direction meets the host-path target, and each op the torch backend's."""
    lines = []
    for r in results["host"]:
        met = r["host_us"] <= HOST_TARGET_US
        lines.append(f"target: {r['op']} {r['direction']} host path <= {HOST_TARGET_US:.0f} us beyond its launches: "
                     f"{r['host_us']:.1f} us, {'met' if met else 'MISSED'} ({r['floor_us']:.1f} us of it the floor "
                     f"of any autograd.Function)")
    for r in results["torch_backend"]:
        met = r["overhead_us"] <= TORCH_BACKEND_TARGET_US
        lines.append(f"target: {r['op']} on the torch backend <= {TORCH_BACKEND_TARGET_US:.0f} us over the PyTorch op: "
                     f"{r['overhead_us']:.1f} us, {'met' if met else 'MISSED'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(REPEATS), default="full")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    args = parser.parse_args(argv)
    if args.json:  # the child of python -m bench (in_child): it ends with its parent
        _processes.watch()
    try:
        results = run(args.size)
    except RuntimeError as exc:
        print(f"python -m bench.host_overhead: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results) if args.json else "\n".join(table(results) + [""] + target_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
