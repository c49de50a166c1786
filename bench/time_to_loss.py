"""``python -m bench.time_to_loss``: training steps and wall time to a target validation loss, per recipe.

"Faster" for a user is the wall time to a model of a given quality: the time per step times the
steps. This trains the same model from the same seeds with each recipe (optimizer and learning-rate
schedule, :data:`RECIPES`) on this machine, recipes taking turns seed by seed, and reads each run's
validation curve from its ``metrics.jsonl``. The target is the baseline recipe's (``adamw``:
nanoGPT's) final validation loss from the same seed. For every recipe it prints the first evaluated
step at which the validation loss reaches the target, and the training seconds until then
(evaluation left out: ``train_seconds``), each the median over the seeds, with their ratios to the
baseline's, and every recipe's final validation loss (the same number of steps for all). It draws
the validation curves against steps and against seconds (``time_to_loss_<scale>.png``).

Scales (:data:`SCALES`): ``small`` (fastgpt-train's default model on the default character corpus,
2000 steps), ``lecture`` (the "Let's build GPT" lecture's shape, ``--preset lecture``, for as many
steps as fit in ``--minutes`` of AdamW training here) and ``tiny`` (seconds: keeps the code working).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastgpt import plot as plotting
from fastgpt import train as training

# name -> fastgpt-train options; the first is the baseline the targets come from.
RECIPES = {
    "adamw": ["--optimizer", "adamw", "--lr_schedule", "cosine"],
    "muon": ["--optimizer", "muon", "--lr_schedule", "cosine"],
    "muon-wsd": ["--optimizer", "muon", "--lr_schedule", "wsd"],
}
BASELINE = "adamw"


@dataclasses.dataclass(frozen=True)
class Scale:
    """A model and run length: fastgpt-train options, the steps (or minutes of baseline training to
    fit), and how often and how long to evaluate."""
    options: tuple
    steps: int | None
    eval_interval: int
    eval_iters: int
    minutes: float | None = None


SCALES = {
    "tiny": Scale(("--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
                   "--warmup_iters", "2"), 20, 10, 2),
    "small": Scale((), 2000, 100, 50),
    # About 7 s a step on a 2-core CPU (64 sequences of 256), so some 80 steps fit in ten minutes:
    # a 10-step warmup (the preset's 100 would outlast the run), evaluated every 5 steps on 3 batches.
    "lecture": Scale(("--preset", "lecture", "--warmup_iters", "10"), None, 5, 3, minutes=10.0),
}


def run(recipe: str, scale: Scale, steps: int, seed: int, out_dir: Path, dataset: str = "default",
        data_dir: str = "data_cache") -> list[dict]:
    """One training run in this process: its evaluations ``[{"step", "seconds", "val_loss"}]``."""
    args = [*scale.options, *RECIPES[recipe], "--dataset", dataset, "--data_dir", data_dir, "--out_dir", str(out_dir),
            "--max_iters", str(steps), "--eval_interval", str(scale.eval_interval), "--eval_iters",
            str(scale.eval_iters), "--seed", str(seed), "--sample_tokens", "0", "--log_interval",
            str(scale.eval_interval)]
    with open(out_dir.parent / f"{out_dir.name}.log", "w") as log, contextlib.redirect_stderr(log):
        if training.main(args) != 0:
            raise RuntimeError(f"training {recipe} (seed {seed}) failed: see {out_dir.parent / out_dir.name}.log")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "seconds": r["train_seconds"], "val_loss": r["val_loss"]}
            for r in records if "val_loss" in r]


def steps_that_fit(scale: Scale, seconds: float, seed: int, work: Path, **data) -> int:
    """The steps of baseline training that take about ``seconds`` here, a multiple of the eval
    interval, timed on a short run of the baseline recipe."""
    probe = Scale(scale.options, None, scale.eval_interval, 1)
    evals = run(BASELINE, probe, scale.eval_interval, seed, work / "probe", **data)
    per_step = evals[-1]["seconds"] / scale.eval_interval
    return max(scale.eval_interval, int(seconds / per_step) // scale.eval_interval * scale.eval_interval)


def reached(evals: list[dict], target: float) -> dict | None:
    """The first evaluation at or below ``target`` (None if the run never got there)."""
    return next((e for e in evals if e["val_loss"] <= target), None)


def summarise(runs: dict[str, list[list[dict]]]) -> dict:
    """Per recipe, over its seeds' runs: the median steps and seconds to the target, their ratios to
    the baseline's, and the median final val loss. Seed by seed, the target is the baseline's final
    val loss from that seed (the baseline reaches it by its last step, often sooner)."""
    targets = [evals[-1]["val_loss"] for evals in runs[BASELINE]]
    rows = {}
    for recipe, seeds in runs.items():
        hits = [reached(evals, target) for evals, target in zip(seeds, targets)]
        every = all(h is not None for h in hits)
        rows[recipe] = {
            "reached": f"{sum(h is not None for h in hits)}/{len(hits)}",
            "steps": statistics.median(h["step"] for h in hits) if every else None,
            "seconds": statistics.median(h["seconds"] for h in hits) if every else None,
            "final_val_loss": statistics.median(evals[-1]["val_loss"] for evals in seeds),
            "final_step": seeds[0][-1]["step"],
        }
    base = rows[BASELINE]
    for row in rows.values():
        for key in ("steps", "seconds"):
            row[f"{key}_ratio"] = None if row[key] is None else row[key] / base[key]
    return {"targets": targets, "target": statistics.median(targets), "recipes": rows}


def table(summary: dict) -> list[str]:
    lines = [f"target: {BASELINE}'s final val loss from the same seed (median {summary['target']:.4f})",
             f"{'recipe':<10} {'reached':>7} {'steps':>7} {'x ' + BASELINE:>8} {'seconds':>8} {'x ' + BASELINE:>8} "
             f"{'final val loss':>15}"]
    for recipe, r in summary["recipes"].items():
        cell = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"{recipe:<10} {r['reached']:>7} {cell(r['steps'], '.0f'):>7} {cell(r['steps_ratio'], '.2f'):>8} "
                     f"{cell(r['seconds'], '.1f'):>8} {cell(r['seconds_ratio'], '.2f'):>8} "
                     f"{r['final_val_loss']:>15.4f}")
    return lines


def plot(runs: dict[str, list[list[dict]]], summary: dict, path: Path, title: str) -> Path | None:
    """Validation loss against steps and against training seconds, one line per run; None without matplotlib."""
    if not plotting.have_matplotlib():
        return None
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for axis, x, label in ((axes[0], "step", "step"), (axes[1], "seconds", "training seconds")):
        for recipe, seeds in runs.items():
            for i, evals in enumerate(seeds):
                axis.plot([e[x] for e in evals], [e["val_loss"] for e in evals], color=colors[recipe],
                          alpha=0.8, linewidth=1, label=recipe if i == 0 else None)
        axis.axhline(summary["target"], color="grey", linewidth=0.8, linestyle="--", label="target")
        axis.set_xlabel(label)
        axis.set_ylabel("val loss")
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return plotting.save(fig, path, dpi=110)


def measure(scale_name: str, seeds: int = 3, recipes=tuple(RECIPES), out: Path | None = None,
            minutes: float | None = None, dataset: str = "default", data_dir: str = "data_cache", log=print) -> dict:
    """Every recipe at ``scale_name`` over ``seeds`` seeds (recipes in turn, seed by seed): the runs'
    evaluations, the steps, the summary, and the plot's path (in ``out``)."""
    if BASELINE not in recipes:
        raise ValueError(f"the recipes must include the baseline {BASELINE!r}, got {', '.join(recipes)}")
    scale = SCALES[scale_name]
    data = dict(dataset=dataset, data_dir=data_dir)
    with tempfile.TemporaryDirectory(prefix="time-to-loss-") as tmp:
        work = Path(tmp)
        steps = scale.steps
        if steps is None:
            steps = steps_that_fit(scale, 60 * (minutes or scale.minutes), 0, work, **data)
            log(f"  {scale_name}: {steps} steps fit in about {minutes or scale.minutes:g} minutes of {BASELINE} here")
        runs = {recipe: [] for recipe in recipes}
        for seed in range(seeds):
            for recipe in recipes:
                started = time.perf_counter()
                evals = run(recipe, scale, steps, 1337 + seed, work / f"{recipe}-{seed}", **data)
                runs[recipe].append(evals)
                log(f"  {scale_name} {recipe} seed {seed}: val loss {evals[-1]['val_loss']:.4f} after {steps} steps "
                    f"({time.perf_counter() - started:.0f} s)")
    summary = summarise(runs)
    result = {"scale": scale_name, "steps": steps, "seeds": seeds, "recipes": {r: RECIPES[r] for r in recipes},
              "runs": runs, "summary": summary}
    if out is not None:
        drawn = plot(runs, summary, out / f"time_to_loss_{scale_name}.png",
                     f"time to loss, {scale_name} scale, {seeds} seed(s), steps and training seconds")
        result["plot"] = None if drawn is None else str(drawn)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_loss", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="(default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per recipe (default: %(default)s)")
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                        help="only these recipes (repeatable; the baseline always runs)")
    parser.add_argument("--minutes", type=float, help="lecture scale: minutes of baseline training (default: 10)")
    parser.add_argument("--dataset", default="default", help="fastgpt-train's --dataset (default: %(default)s)")
    parser.add_argument("--data_dir", default="data_cache", help="fastgpt-train's --data_dir (default: %(default)s)")
    parser.add_argument("--out", default="out/bench", help="folder for the JSON and the plot (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    recipes = tuple(dict.fromkeys([BASELINE, *(args.recipe or RECIPES)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"python -m bench.time_to_loss: {args.scale} scale, {', '.join(recipes)}, {args.seeds} seed(s)", flush=True)
    result = measure(args.scale, args.seeds, recipes, out, args.minutes, args.dataset, args.data_dir,
                     log=lambda text: print(text, flush=True))
    print("\n".join(table(result["summary"])))
    path = out / f"time_to_loss_{args.scale}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}" + (f", {result['plot']}" if result["plot"] else " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
