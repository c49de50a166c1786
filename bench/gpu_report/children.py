"""The GPU report's child processes: each stage, and the processes stages start, run as a process
group of its own, which is ended whole (everything it started too) on a timeout or a stop."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastgpt_kernels import _processes

ROOT = Path(__file__).resolve().parents[2]


def child_env(cuda: bool) -> dict:
    """A stage's environment: the GPU's as it is; without one, Triton's interpreter switched on
    (read when the kernels are imported) and NumPy's BLAS on one thread (its matmuls are one small
    tile each in the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not cuda:
        env = {"OPENBLAS_NUM_THREADS": "1", **env, "TRITON_INTERPRET": "1"}
    return env


STOP_GRACE_S = 3.0  # how long a stopped process group gets between SIGTERM and SIGKILL
DEADLINE_GRACE_S = 10.0  # how long past its deadline the parent waits for a stage to end itself


def start_group(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start ``command`` in its own session and process group, its output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_group(command: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, str, float]:
    """Run ``command`` (:func:`start_group`): ``(exit status or None on timeout, output, seconds)``. On
    timeout, and when this process is stopped (Ctrl-C, SIGTERM, SIGHUP: the exception goes on), the
    group and every process it started are ended."""
    start = time.monotonic()
    proc = start_group(command, env, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(proc)
        code = None
    except BaseException:
        end_group(proc)
        raise
    return code, log.read_text(errors="replace"), time.monotonic() - start


def end_group(proc: subprocess.Popen) -> None:
    """End ``proc`` (a process group's leader), its group and every process it started: SIGTERM,
    which a stage turns into its own cleanup, then SIGKILL for whatever is left after a grace."""
    tree = _processes.descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    tree += _processes.descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def last_record(path: Path) -> dict:
    """The last complete JSON line a stage recorded in ``path`` ({} when none)."""
    if not path.exists():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the stage was killed
            continue
    return {}


def stage_command(name: str, tiny: bool, deadline: float, result: Path) -> list[str]:
    """The child process that runs stage ``name`` until ``deadline`` (``time.time()``), and no longer
    than this process lives."""
    command = [sys.executable, "-m", "bench.gpu_report", "--stage", name, "--deadline", f"{deadline:.3f}",
               "--result", str(result), "--parent", str(os.getpid())]
    return command + ["--tiny"] if tiny else command
