"""``python -m bench``: per-op and end-to-end benchmarks against the naive lecture model and plain PyTorch, and the step model.

Runs what this machine can run, side by side in one process: the per-op benchmarks
(:mod:`bench.ops`), training steps of the naive lecture model, plain PyTorch and fastgpt
(:mod:`bench.train_step`), GPT-2 124M's step in plain PyTorch, with fastgpt's unfused and fused
loss, and with recompute (:func:`bench.train_step.run_gpt2`), generation with and without the KV cache
(:mod:`bench.generate`), the host cost of each op's Triton path
(:mod:`bench.host_overhead`, in a child process with Triton's interpreter on), the training steps
and seconds each optimizer recipe takes to a target validation loss (:mod:`bench.time_to_loss`:
the small model, 3 seeds; one seed with ``--quick``), and prints the model of a GPU step
(:mod:`bench.step_model`, formulas, no measurement). Prints tables, writes
``results.json`` (the machine and every figure) and PNG plots into ``--out``.

Sizes: ``--quick`` (fewer rounds; GPT-2 at one batch), the default full run (about 23 minutes on
a 2-core CPU: 16 for the parts before generation, 7 for generation, measured apart, when the GPT-2
part timed two variants, not five: its ``--quick`` part alone now takes about 6.5 minutes; the
time-to-loss part about 24 more, measured on its own), and ``--tiny``
(seconds; keeps the code working, its figures mean nothing).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from fastgpt import plot as plotting
from fastgpt.model import RECOMPUTE

from bench import generate, host_overhead, measure, ops, step_model, time_to_loss, train_step

# The end-to-end targets: fastgpt's default training step against the naive model's (ratios).
SPEEDUP_TARGETS = {256: 2.5, 1024: 3.0}
MEMORY_TARGET = (1024, 1 / 3)  # at this context, fastgpt's peak step memory at most this fraction
# GPT-2 124M at the largest batch timed, peak step memory: (variant, baseline) -> at most this fraction.
GPT2_MEMORY_TARGETS = {("fused", "unfused"): 0.6, ("fused+block", "plain"): 0.35}
DEFAULT_ROUNDS = {"tiny": 1, "quick": 3, "full": 7}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="a short run")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                      help="tiny shapes, one round: checks that the benchmarks run (figures meaningless)")
    parser.set_defaults(size="full")
    parser.add_argument("--out", default="out/bench", help="folder for results.json and the plots (default: %(default)s)")
    parser.add_argument("--rounds", type=int, help="timed rounds per measurement (default: 1 tiny, 3 quick, 7 full)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout of both models in the training step (default: %(default)s)")
    parser.add_argument("--profile", choices=train_step.PRECISIONS,
                        help="also profile two training steps of each side in this precision at the first context")
    parser.add_argument("--skip", action="append",
                        choices=("ops", "train", "gpt2", "generate", "host", "loss", "model"), default=[],
                        help="leave out a part: the per-op benchmarks, the lecture-shape training steps, GPT-2's "
                        "fused against unfused loss, generation with and without the KV cache, the host overhead, "
                        "the time to a target loss per optimizer recipe, the step model (repeatable)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


# --------------------------------------------------------------------------- tables


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def ops_table(rows: list[dict]) -> list[str]:
    lines = [f"{'op':<20} {'shape':<20} {'pass':<17} {'provider':<10} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} "
             f"{'peak MiB':>9}  note"]
    for r in rows:
        head = f"{r['op']:<20} {r['shape']:<20} {r['pass']:<17} {r['provider']:<10}"
        if r["status"] != "measured":
            lines.append(f"{head} {'-':>9} {'-':>8} {'-':>7} {'-':>9}  {r['status']}")
            continue
        rate = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"{head} {r['time_s'] * 1e3:>9.2f} {rate(r['tflops'], '.3f'):>8} {rate(r['gbps'], '.1f'):>7} "
                     f"{_mib(r['peak_memory_bytes']):>9}")
    return lines


def _ratio_cells(r: dict) -> str:
    memory = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
    spread = f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"
    return f"{r['speedup']:>7.2f}x {spread:>13} {memory:>7}"


def train_table(rows: list[dict], ratio_rows: list[dict]) -> list[str]:
    lines = [f"{'T':>5} {'B':>3} {'side':<8} {'precision':<10} {'tokens/s':>9} {'MFU':>6} {'peak MiB':>9}"]
    for r in rows:
        lines.append(f"{r['context']:>5} {r['batch']:>3} {r['side']:<8} "
                     f"{r['precision'] + (' *' if r['default'] else ''):<10} {r['tokens_per_s']:>9.0f} "
                     f"{r['mfu']:>6.1%} {_mib(r['peak_memory_bytes']):>9}")
    lines.append("(* the side's default precision; plain PyTorch is compared at the same precision only)")
    lines += sorted({f"fastgpt at T={r['context']}: {r['backend']}" for r in rows
                     if r["side"] == "fastgpt" and r["backend"].startswith("auto")})
    lines.append("")
    lines.append(f"{'T':>5} {'fastgpt vs':<10} {'compared':<15} {'fastgpt':<9} {'other':<9} {'speed-up':>8} "
                 f"{'(rounds)':>13} {'memory':>7}")
    for r in ratio_rows:
        lines.append(f"{r['context']:>5} {r['baseline']:<10} {r['compared']:<15} {r['fastgpt']:<9} "
                     f"{r['baseline_precision']:<9} {_ratio_cells(r)}")
    lines.append("(speed-up: median over rounds of the other side's time / fastgpt's in the same round, and its "
                 "range; memory: fastgpt's peak / the other side's)")
    return lines


def target_lines(ratio_rows: list[dict]) -> list[str]:
    """Each target, met or missed, from the default-against-default ratios with the naive model."""
    defaults = {r["context"]: r for r in ratio_rows if r["baseline"] == "naive" and r["compared"] == "defaults"}
    lines = []
    for context, target in SPEEDUP_TARGETS.items():
        if context in defaults:
            got = defaults[context]["speedup"]
            lines.append(f"target: speed-up >= {target}x at T={context}: {got:.3f}x, {'met' if got >= target else 'MISSED'}")
    context, fraction = MEMORY_TARGET
    if context in defaults and defaults[context]["memory_ratio"] is not None:
        got = defaults[context]["memory_ratio"]
        lines.append(f"target: peak memory <= {fraction:.3f} of naive at T={context}: {got:.3f}, "
                     f"{'met' if got <= fraction else 'MISSED'}")
    return lines


def gpt2_table(rows: list[dict], ratio_rows: list[dict]) -> list[str]:
    lines = [f"{'B':>3} {'variant':<12} {'tokens/s':>9} {'peak MiB':>9}"]
    for r in rows:
        lines.append(f"{r['batch']:>3} {r['variant']:<12} {r['tokens_per_s']:>9.0f} {_mib(r['peak_memory_bytes']):>9}")
    lines += ["", f"{'B':>3} {'variant':<12} {'against':<8} {'speed-up':>8} {'(rounds)':>13} {'memory':>7}"]
    lines += [f"{r['batch']:>3} {r['variant']:<12} {r['baseline']:<8} {_ratio_cells(r)}" for r in ratio_rows]
    lines.append("(plain: plain PyTorch, logits then F.cross_entropy; unfused: fastgpt's GPT with that loss; fused: "
                 "its fused loss; +mlp, +block: what each block recomputes in the backward. speed-up: the other's "
                 "time / this one's, paired by round; memory: this one's peak / the other's)")
    return lines


def gpt2_target_lines(ratio_rows: list[dict]) -> list[str]:
    """The GPT-2 memory targets at the largest batch measured."""
    batch = max(r["batch"] for r in ratio_rows)
    by = {(r["variant"], r["baseline"]): r for r in ratio_rows if r["batch"] == batch}
    lines = []
    for (variant, baseline), fraction in GPT2_MEMORY_TARGETS.items():
        got = by[variant, baseline]["memory_ratio"]
        lines.append(f"target: GPT-2 124M peak memory, {variant} <= {fraction} of {baseline} at B={batch}: "
                     f"{got:.3f}, {'met' if got <= fraction else 'MISSED'}")
    return lines


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def model_tables(projection: dict) -> list[str]:
    """The step model's tables: time per op group and GPU, bytes and FLOPs, memory, and the ratios."""
    builds, gpus = projection["builds"], step_model.MODEL_GPUS
    columns = [(b, g) for b in step_model.BUILDS for g in gpus]
    width = 13
    head = f"{'':<18}" + "".join(f"{b + ' ' + g.split()[0]:>{width}}" for b, g in columns)
    lines = ["Where the time goes (ms):", head]
    for group in (*step_model.GROUPS, "step"):
        lines.append(f"{group:<18}" + "".join(
            f"{builds[b]['gpus'][g]['groups'][group]['seconds'] * 1e3:>{width}.2f}" for b, g in columns))
    for label, fmt in (("tokens/s", lambda x: f"{x['tokens_per_s']:.0f}"), ("MFU", lambda x: f"{x['mfu']:.1%}")):
        lines.append(f"{label:<18}" + "".join(f"{fmt(builds[b]['gpus'][g]):>{width}}" for b, g in columns))
    groups = {b: builds[b]["gpus"][gpus[0]]["groups"] for b in step_model.BUILDS}
    lines += ["", "Bytes moved (GB), FLOPs executed (TFLOP) and kernel launches, per step:",
              f"{'':<18}" + "".join(f"{b:>27}" for b in step_model.BUILDS),
              f"{'':<18}" + f"{'GB':>9}{'TFLOP':>9}{'launches':>9}" * len(step_model.BUILDS)]
    for group in (*step_model.GROUPS, "step"):
        lines.append(f"{group:<18}" + "".join(
            f"{groups[b][group]['bytes'] / 1e9:>9.2f}{groups[b][group]['flops'] / 1e12:>9.2f}"
            f"{groups[b][group]['launches']:>9}" for b in step_model.BUILDS))
    lines += ["", "Where the memory goes (GiB):", f"{'':<28}" + "".join(f"{b:>{width}}" for b in step_model.BUILDS)]
    for key in builds["plain"]["memory"]:
        lines.append(f"{key:<28}" + "".join(f"{_gib(builds[b]['memory'][key]):>{width}}" for b in step_model.BUILDS))
    lines += ["", f"The largest micro-batch of T={projection['shape']['seq_len']} that fits an 80 GB GPU "
                  f"(modelled peak of fastgpt's step <= {step_model.FIT_USABLE:.0%} of 80 GB), per recompute setting:",
              f"{'':<12}" + "".join(f"{mode:>7}" for mode in RECOMPUTE)]
    for name, fits in projection["micro_batches"].items():
        lines.append(f"{name:<12}" + "".join(f"{fits[mode]:>7}" for mode in RECOMPUTE))
    lines.append("")
    for other, r in projection["ratios"].items():
        speed = ", ".join(f"{r['speedup'][g]:.2f}x on {g}" for g in gpus)
        lines.append(f"fastgpt against {other} (modelled): tokens/s {speed}; peak memory {r['memory']:.2f}x")
    return lines


# --------------------------------------------------------------------------- plots


def plot(results: dict, out: Path) -> list[Path] | None:
    """PNG plots of the training step and the per-op speed-ups; None without matplotlib."""
    if not plotting.have_matplotlib():
        return None
    plt = plotting.pyplot()
    _save = functools.partial(plotting.save, dpi=110)

    machine = results["machine"]["gpu"] or results["machine"]["cpu"]
    paths = []
    train = results.get("train_step") or []
    if train:
        fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
        for side in train_step.SIDES:
            for precision in sorted({r["precision"] for r in train}):
                rows = [r for r in train if r["side"] == side and r["precision"] == precision]
                contexts = [r["context"] for r in rows]
                speed.plot(contexts, [r["tokens_per_s"] for r in rows], marker="o", label=f"{side} {precision}")
                memory.plot(contexts, [r["peak_memory_bytes"] / 2**20 for r in rows], marker="o",
                            label=f"{side} {precision}")
        for axis, ylabel in ((speed, "tokens/s"), (memory, "peak memory of one step (MiB)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("context length T")
            axis.set_ylabel(ylabel)
            axis.legend(fontsize=8)
        fig.suptitle(f"training step, lecture shape, {machine}", fontsize=9)
        paths.append(_save(fig, out / "train_step.png"))
    measured = [r for r in results.get("ops") or [] if r["status"] == "measured"]
    if measured:
        base = {(r["op"], r["pass"]): r["time_s"] for r in measured if r["provider"] == ops.baseline(r["op"])}
        short = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}
        bars = [(f"{r['op']}\n{short[r['pass']]}\n{r['provider']}", base[r["op"], r["pass"]] / r["time_s"])
                for r in measured if r["provider"] != ops.baseline(r["op"]) and (r["op"], r["pass"]) in base]
        fig, axis = plt.subplots(figsize=(max(6, 0.7 * len(bars)), 4))
        axis.bar(range(len(bars)), [b[1] for b in bars])
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
        axis.set_ylabel("speed-up over the naive ops, or the unfused loss (x)")
        axis.set_title(f"per op, {measured[0]['dtype']}, {machine}", fontsize=9)
        paths.append(_save(fig, out / "ops_speedup.png"))
    return paths


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.profile and args.profile not in train_step.precisions(device):
        print(f"python -m bench: --profile {args.profile} is not available on this device; "
              f"choose one of {', '.join(train_step.precisions(device))}", file=sys.stderr)
        return 2
    rounds = args.rounds or DEFAULT_ROUNDS[args.size]
    op_dtype = ops.timing_dtype(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "size": args.size, "rounds": rounds, "machine": measure.machine_info(device),
               "memory_method": measure.memory_method(device)}
    machine = results["machine"]
    print(f"python -m bench ({args.size}) on {machine['gpu'] or machine['cpu']}, {machine['cpu_cores']} cores, "
          f"torch {machine['torch']}, triton {machine['triton']}; {rounds} round(s) per figure", flush=True)
    report = []
    if "ops" not in args.skip:
        results["ops"] = ops.run(args.size, device, op_dtype, rounds)
        report += ["", f"Per op ({str(op_dtype).removeprefix('torch.')}, median of {rounds}):", *ops_table(results["ops"])]
    if "train" not in args.skip:
        results["train_step"] = train_step.run(args.size, device, rounds, args.dropout)
        results["train_step_ratios"] = train_step.ratios(results["train_step"])
        report += ["", f"Training step (forward, backward, AdamW), lecture shape, dropout {args.dropout}, "
                       f"median of {rounds}:", *train_table(results["train_step"], results["train_step_ratios"])]
        if args.size != "tiny":
            report += target_lines(results["train_step_ratios"])
    if "gpt2" not in args.skip:
        results["gpt2_step"] = train_step.run_gpt2(args.size, device, rounds)
        results["gpt2_step_ratios"] = train_step.gpt2_ratios(results["gpt2_step"])
        first = results["gpt2_step"][0]
        report += ["", f"GPT-2 124M training step{' (tiny shape)' if args.size == 'tiny' else ''}, T={first['context']}, "
                       f"{first['precision']} autocast, fastgpt's kernels' backend "
                       f"{train_step.fastgpt_backend(device)}: plain PyTorch, the unfused and the fused loss, and "
                       f"recompute, median of {len(first['times_s'])}:",
                   *gpt2_table(results["gpt2_step"], results["gpt2_step_ratios"])]
        if args.size != "tiny":
            report += gpt2_target_lines(results["gpt2_step_ratios"])
    if args.profile:
        context, batch = train_step.CONTEXTS[args.size][0]
        results["profile"] = train_step.profile(args.size, device, args.profile, args.dropout)
        for side, table in results["profile"].items():
            report += ["", f"Profile: {side}, two training steps, {args.profile}, T={context} B={batch} "
                           f"(top ops by self time):", table]
    if "generate" not in args.skip:
        results["generate"] = generate.run(args.size, device)
        report += ["", "Generation (greedy; the same tokens with and without the KV cache), median of "
                       f"{results['generate'][0]['rounds']}:", *generate.table(results["generate"])]
    if "host" not in args.skip:
        from fastgpt_kernels import _dispatch

        if _dispatch.NO_TRITON_REASON is None:
            results["host_overhead"] = host_overhead.in_child("tiny" if args.size == "tiny" else "full")
            report += ["", "Host overhead of the Triton path per call, launches stubbed (bench/host_overhead.py; "
                           "Triton's own launcher excluded: python -m bench.gpu_report times it on a GPU), "
                           "microseconds:", *host_overhead.table(results["host_overhead"])]
            if args.size != "tiny":
                report += host_overhead.target_lines(results["host_overhead"])
        else:
            report += ["", f"Host overhead: not measured ({_dispatch.NO_TRITON_REASON})"]
    if "loss" not in args.skip:
        scale, seeds = {"tiny": ("tiny", 1), "quick": ("small", 1), "full": ("small", 3)}[args.size]
        results["time_to_loss"] = time_to_loss.measure(scale, seeds, out=out, data_dir=str(out / "data_cache"),
                                                       log=lambda text: print(text, flush=True))
        report += ["", f"Time to a target val loss per optimizer recipe ({scale} model, {seeds} seed(s), "
                       "bench/time_to_loss.py):", *time_to_loss.table(results["time_to_loss"]["summary"])]
    if "model" not in args.skip:
        results["step_model"] = step_model.project()
        shape = results["step_model"]["shape"]
        report += ["", f"Step model (NOT measured: a model of a GPU step from every kernel's FLOPs and bytes, "
                       f"see bench/step_model.py): GPT-2 124M, B={shape['batch']} T={shape['seq_len']}, bfloat16 "
                       f"autocast; matmuls at {step_model.TENSOR_CORE_EFFICIENCY:.0%} of the dense bfloat16 peak, "
                       f"bytes at {step_model.BANDWIDTH_EFFICIENCY:.0%} of HBM bandwidth, "
                       f"{step_model.LAUNCH_SECONDS * 1e6:.0f} us per launch; data-sheet H100 SXM and H200",
                   *model_tables(results["step_model"])]
    report += ["", f"peak memory: {results['memory_method']}"]
    print("\n".join(report))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    paths = plot(results, out)
    print(f"\nwrote {out / 'results.json'}" + "".join(f", {p}" for p in paths or [])
          + (" (no plots: matplotlib is not installed)" if paths is None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
