"""``python -m fastgpt.plot RUN [RUN ...]``: one PNG comparing training runs from their ``metrics.jsonl``.

Panels: train and validation loss against steps, validation loss against tokens, the learning
rate, tokens/s, MFU, and HellaSwag's acc_norm where a run logged it (``--hellaswag``). A RUN is a
run directory (``--out_dir`` of fastgpt-train) or its ``metrics.jsonl``. The training loop draws
its own ``metrics.png`` at every evaluation. matplotlib is an optional extra:
``pip install 'fastgpt[plot]'``.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import time
from pathlib import Path

from fastgpt.checkpoint import atomic_writer

INSTALL_HINT = "drawing needs matplotlib: pip install 'fastgpt[plot]' (or pip install matplotlib)"
# (panel title, x, the y fields): the training records (every log_interval steps) hold loss, lr,
# tokens_per_s and mfu; the evaluation records (every eval_interval) val_loss and hellaswag_*.
PANELS = (
    ("loss", "step", ("loss", "val_loss")),
    ("val loss against tokens", "tokens", ("val_loss",)),
    ("learning rate", "step", ("lr",)),
    ("tokens/s", "step", ("tokens_per_s",)),
    ("MFU", "step", ("mfu",)),
    ("HellaSwag acc_norm", "step", ("hellaswag_acc_norm",)),
)


def metrics_file(run: str | Path) -> Path:
    """The ``metrics.jsonl`` of a run directory (or the file itself)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}: give a fastgpt-train --out_dir or its metrics.jsonl")
    return path


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``; a last line cut short by a running writer is left out."""
    path = metrics_file(run)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not JSON: {exc}") from None
    return records


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend); ImportError with
    :data:`INSTALL_HINT` without matplotlib."""
    if not have_matplotlib():
        raise ImportError(INSTALL_HINT)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 100) -> Path:
    """``fig`` laid out and written to the PNG ``path`` atomically, then closed."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    with atomic_writer(path) as f:
        f.write(buffer.getvalue())
    return Path(path)


def draw(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """``runs`` (label -> records) drawn into the PNG ``path``, written atomically; raises
    ImportError (with :data:`INSTALL_HINT`) without matplotlib."""
    fig, axes = pyplot().subplots(2, 3, figsize=(14, 7))
    for axis, (name, x, ys) in zip(axes.flat, PANELS):
        drawn = False
        for label, records in runs.items():
            for y in ys:
                points = [(r[x], r[y]) for r in records if x in r and r.get(y) is not None]
                if points:
                    axis.plot(*zip(*points), marker="." if y == "val_loss" or len(points) < 30 else None,
                              linewidth=1, label=f"{label} {y}" if len(ys) > 1 else label)
                    drawn = True
        axis.set_title(name, fontsize=9)
        axis.set_xlabel(x)
        if drawn:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="grey")
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)


class Redrawer:
    """A run's ``metrics.png``, redrawn from its ``metrics.jsonl`` when called (after an evaluation):
    at most every ``seconds``, and on a ``final`` call. Without matplotlib the first call says, through
    ``say``, how to get it, and later calls do nothing."""

    def __init__(self, run_dir: str | Path, seconds: float, say):
        self.run_dir, self.seconds, self.say = Path(run_dir), seconds, say
        self.drawn_at: float | None = None  # time.monotonic() of the last drawing
        self.missing = False  # matplotlib was found missing (and said so)

    def __call__(self, final: bool = False) -> None:
        if self.missing or not (final or self.drawn_at is None or time.monotonic() - self.drawn_at >= self.seconds):
            return
        if not have_matplotlib():
            self.missing = True
            self.say(f"metrics.png not drawn: {INSTALL_HINT}")
            return
        draw({str(self.run_dir): read_metrics(self.run_dir)}, self.run_dir / "metrics.png", str(self.run_dir))
        self.drawn_at = time.monotonic()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgpt.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (fastgpt-train --out_dir) or metrics.jsonl files")
    parser.add_argument("--out", help="the PNG to write (default: RUN/metrics.png for one run, runs.png for more)")
    args = parser.parse_args(argv)
    if not have_matplotlib():
        print(f"python -m fastgpt.plot: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        runs = {str(run): read_metrics(run) for run in args.runs}
    except (FileNotFoundError, ValueError) as exc:
        print(f"python -m fastgpt.plot: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (metrics_file(args.runs[0]).parent / "metrics.png" if len(args.runs) == 1
                                           else Path("runs.png"))
    print(f"wrote {draw(runs, out, ', '.join(runs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
