"""``python -m bench.process_memory -- COMMAND ...``: the peak memory of a command and its child processes.

Runs ``COMMAND``, and every ``--interval`` seconds (default 0.1) reads from Linux's
``/proc/<pid>/smaps_rollup`` the RSS and PSS of it and of every process below it. It prints the
exit status, the wall time, and the peaks of the sums over the processes (RSS counts the pages
forked workers share with their parent once per process; PSS splits them among the processes) and
of one process's RSS. How ``fastgpt.prepare``'s memory was measured (docs/data.md). Linux only;
a peak that lasts less than an interval can be missed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from fastgpt_kernels import _processes


def rss_pss(pid: int) -> tuple[int, int]:
    """Bytes of ``pid``'s RSS and PSS now; (0, 0) for a process that has ended."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines[1:] if line.endswith(" kB")}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def measure(argv: list[str], interval: float = 0.1) -> dict:
    """Run ``argv`` to its end: ``{"exit", "seconds", "peak_rss_sum", "peak_pss_sum", "peak_rss_one"}``
    (bytes), sampled every ``interval`` seconds."""
    if not Path("/proc/self/smaps_rollup").exists():
        raise RuntimeError("bench.process_memory reads /proc/<pid>/smaps_rollup: Linux 4.14 or later only")
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    peaks = {"peak_rss_sum": 0, "peak_pss_sum": 0, "peak_rss_one": 0}
    while proc.poll() is None:
        sizes = [rss_pss(pid) for pid in (proc.pid, *_processes.descendants(proc.pid))]
        peaks["peak_rss_sum"] = max(peaks["peak_rss_sum"], sum(rss for rss, _ in sizes))
        peaks["peak_pss_sum"] = max(peaks["peak_pss_sum"], sum(pss for _, pss in sizes))
        peaks["peak_rss_one"] = max([peaks["peak_rss_one"], *(rss for rss, _ in sizes)])
        time.sleep(interval)
    return {"exit": proc.returncode, "seconds": time.perf_counter() - start, **peaks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.process_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    if args.interval <= 0:
        parser.error(f"--interval must be > 0, got {args.interval}")
    result = measure(command, args.interval)
    print(f"exit {result['exit']} in {result['seconds']:.1f} s; peak sum over the processes: RSS "
          f"{result['peak_rss_sum'] / 1e6:.0f} MB, PSS {result['peak_pss_sum'] / 1e6:.0f} MB; peak RSS of one "
          f"process {result['peak_rss_one'] / 1e6:.0f} MB", flush=True)
    return result["exit"]


if __name__ == "__main__":
    sys.exit(main())
