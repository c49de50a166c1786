"""Worker processes that never outlive what started them: the one place that decides how.

The commands that start processes (the GPU report's stages and what they run, the worker pools of
corpus preparation and of the compile report) stop them all however they are stopped themselves:

- :func:`stop_on_signals` turns SIGTERM and SIGHUP (a ``kill``, a CI timeout, a lost terminal) into
  :class:`Stopped`, a ``KeyboardInterrupt``, so the cleanup that Ctrl-C runs (pools shut down,
  stage processes killed) runs for them too;
- :func:`watch`, started in each worker, ends the worker once its parent is gone (killed outright,
  SIGKILL included, or crashed: the worker is then adopted by another process) or, given one, once
  a deadline has passed, after killing every process the worker started itself;
- :func:`kill_tree` ends a process's descendants, found through ``/proc`` (Linux), whatever
  process group or session they put themselves in.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

ORPHANED_EXIT = 125  # a worker's exit status when it ended itself because its parent was gone
DEADLINE_EXIT = 124  # ... because its deadline passed (``timeout``'s status)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (elsewhere:
    nothing changes, as only the main thread can handle signals). The old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from ``/proc`` (empty where there is none: not Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it.
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every descendant of ``pid`` (not ``pid`` itself); returns their pids."""
    pids = descendants(pid)
    for child in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)
    return pids


def watch(parent: int | None = None, deadline: float | None = None,
          on_exit: Callable[[str], None] | None = None, interval: float = 0.2) -> threading.Thread:
    """End this process once ``parent`` (default: the current parent) is no longer its parent, or
    once ``time.time()`` passes ``deadline``: ``on_exit("orphaned" or "deadline")`` runs first (say,
    to record partial results), then every process this one started is killed, and this process
    exits with :data:`ORPHANED_EXIT` or :data:`DEADLINE_EXIT`. Watches from a daemon thread."""
    parent = os.getppid() if parent is None else parent

    def end(reason: str, status: int) -> None:
        if on_exit is not None:
            with contextlib.suppress(Exception):
                on_exit(reason)
        kill_tree(os.getpid())
        os._exit(status)

    def run() -> None:
        while True:
            if os.getppid() != parent:
                end("orphaned", ORPHANED_EXIT)
            if deadline is not None and time.time() >= deadline:
                end("deadline", DEADLINE_EXIT)
            time.sleep(interval)

    thread = threading.Thread(target=run, name="fastgpt-watch", daemon=True)
    thread.start()
    return thread
