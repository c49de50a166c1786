"""``python -m bench.gpu_report``: everything a GPU machine can show about the kernels, in a few minutes.

The parent process: runs each stage of :mod:`bench.gpu_report.stages` as a child process group with its
own budget, keeps what each recorded, and writes ``report.json`` and ``report.md`` after every stage.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from bench.gpu_report import children
from bench.gpu_report.children import DEADLINE_GRACE_S, child_env, last_record, run_group
from bench.gpu_report.report import markdown, summary
from bench.gpu_report.stages import STAGES, TAIL_CHARS, TARGETS, Stage, run_stage
from fastgpt_kernels import _processes


def run_one(stage: Stage, tiny: bool, budget: float, logs: Path, cuda: bool) -> dict:
    """Run ``stage`` in its child process within ``budget`` seconds; its entry of ``report.json``."""
    result = logs / f"{stage.name}.result.jsonl"
    result.unlink(missing_ok=True)
    command = children.stage_command(stage.name, tiny, time.time() + budget, result)
    code, output, seconds = run_group(command, child_env(cuda), budget + DEADLINE_GRACE_S,
                                      logs / f"{stage.name}.log")
    figures = last_record(result)
    status, reason = figures.pop("status", None), figures.pop("reason", None)
    if code is None:
        status, reason = "timeout", f"still running {DEADLINE_GRACE_S:.0f} s after its budget of {budget:.0f} s; killed"
    elif code == _processes.DEADLINE_EXIT and status == "timeout":
        reason = f"{reason} (budget {budget:.0f} s)"
    elif code != 0 or status is None:
        status = "failed"
        reason = reason or (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
    return {"status": status, "reason": reason, "seconds": round(seconds, 2), "budget_s": budget,
            "figures": figures, "output_tail": output[-TAIL_CHARS:]}


def _part(text: str) -> tuple[int, int]:
    index, parts = (int(n) for n in text.split("/"))
    if not 0 <= index < parts:
        raise ValueError(text)
    return index, parts


def parse_args(argv=None):
    """The report's options (and the hidden ones of a stage's child process)."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu_report", help="folder for report.json, report.md and logs/ "
                                                                "(default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes and budgets: checks that the report runs (figures meaningless)")
    parser.add_argument("--only", action="append", choices=list(STAGES), metavar="STAGE",
                        help=f"run only this stage (repeatable; one of {', '.join(STAGES)})")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's time budget (default: %(default)s)")
    parser.add_argument("--stage", choices=[*STAGES, *TARGETS], help=argparse.SUPPRESS)  # a child: one stage
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # the child's figures (JSON lines)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # the child's end, time.time()
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # the child ends when this process is gone
    parser.add_argument("--part", type=_part, default=(0, 1), help=argparse.SUPPRESS)  # a warm-up worker's share
    args = parser.parse_args(argv)
    if not args.budget_scale > 0:
        parser.error(f"--budget-scale must be positive, got {args.budget_scale}")
    return args


def main(argv=None) -> int:
    """Run the report (or, with ``--stage``, one stage as the report's child); 0 when no stage failed."""
    args = parse_args(argv)
    if args.stage:
        stage = {**STAGES, **TARGETS}[args.stage]
        deadline = args.deadline or time.time() + stage.budget(args.tiny)
        return run_stage(args.stage, args.tiny, deadline, args.result, args.parent, args.part)
    from bench import measure

    cuda = torch.cuda.is_available()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    names = [name for name in STAGES if not args.only or name in args.only]
    report = {"command": "python -m bench.gpu_report " + " ".join(sys.argv[1:] if argv is None else argv),
              "tiny": args.tiny, "budget_scale": args.budget_scale,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": measure.machine_info(torch.device("cuda" if cuda else "cpu")), "stages": {}}
    problem = NO_GPU if not cuda and not args.tiny else None
    if cuda and (missing := preflight()):
        problem = "Triton cannot compile kernels on this machine; missing: " + "; ".join(missing)
    if problem:
        report["error"] = problem
        write_report(out, report)
        print(problem, file=sys.stderr)
        return 2
    start, name = time.monotonic(), names[0]
    try:
        with _processes.stop_on_signals():
            for i, name in enumerate(names, 1):
                stage = STAGES[name]
                budget = stage.budget(args.tiny, args.budget_scale)
                print(f"[{i}/{len(names)}] {name}: {stage.title} (budget {budget:.0f} s)", flush=True)
                entry = run_one(stage, args.tiny, budget, logs, cuda)
                report["stages"][name] = entry
                report["total_s"] = round(time.monotonic() - start, 1)
                print(f"[{i}/{len(names)}] {name}: {entry['status']} in {entry['seconds']:.1f} s: "
                      f"{summary(name, entry)}", flush=True)
                write_report(out, report)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (Stopped): the stage was ended with it
        report["error"] = f"stopped ({exc or 'Ctrl-C'}) during the {name} stage; its processes were ended"
        report["total_s"] = round(time.monotonic() - start, 1)
        write_report(out, report)
        print(report["error"], file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    print(f"wrote {out / 'report.json'} and {out / 'report.md'} in {report['total_s']:.0f} s")
    return 0 if all(e["status"] in ("ok", "skipped") for e in report["stages"].values()) else 1


def preflight() -> list[str]:
    """What Triton needs on this host to compile and launch kernels on a GPU, and cannot find: a C
    compiler (it builds its launchers with one), Python's C headers, the CUDA driver's library."""
    import ctypes.util
    import sysconfig

    missing = []
    if not (shutil.which(os.environ.get("CC", "")) or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))):
        missing.append("a C compiler (cc, gcc or clang on PATH, or $CC), with which Triton builds its launchers")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        missing.append(f"Python's C headers (no Python.h in {include}: install the python3-dev package or its like)")
    if not (os.environ.get("TRITON_LIBCUDA_PATH") or ctypes.util.find_library("cuda")):
        missing.append("the CUDA driver's library libcuda.so (not known to ldconfig; or set TRITON_LIBCUDA_PATH)")
    return missing


NO_GPU = ("python -m bench.gpu_report needs a CUDA GPU and PyTorch sees none; rehearse it on this machine "
          "with --tiny (tiny shapes, the kernels in Triton's interpreter)")


def write_report(out: Path, report: dict) -> None:
    """``report.json`` and ``report.md`` as the report stands."""
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
