"""Every command line that README.md and docs/ show, run in ``--help`` form from a directory outside
the checkout, so that none rots: its program exists, and every option it names is one the program
lists. Commands shown with ``--dry-run`` run as they are. The installed commands (``fastgpt-*``) are
found where pip put them, beside this Python.
"""
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Programs the docs show that are not fastgpt's own (their options are theirs to keep).
FOREIGN = {"pip", "hf", "git", "cd", "timeout", "python -m pytest"}
# Modules whose first argument names a subcommand, each with its own options.
SUBCOMMANDS = {"fastgpt.eval"}


def _snippets(text: str):
    """Shell-like text of a Markdown file: indented and fenced code blocks line by line (backslash
    continuations joined), and inline code spans (which may wrap across lines of prose)."""
    fenced, block, prose = False, [], []
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            block.append(line.strip())
            if not block[-1].endswith("\\"):
                yield " ".join(part.rstrip("\\").strip() for part in block)
                block = []
        else:
            prose.append(line)
    yield from (span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", "\n".join(prose)))


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """``(name, argv prefix)`` of a fastgpt command line, or None for anything else."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value assignments
        words = words[1:]
    if words[:1] == ["torchrun"]:  # torchrun's own options, then the script (or -m module) and its options
        start = next((i for i, word in enumerate(words) if word in ("train.py", "-m")), None)
        words = [] if start is None else ["python", *words[start:]]
    if not words:
        return None
    if words[0].startswith("fastgpt-"):
        return words[0], [words[0]]
    if words[0] == "python" and len(words) > 1:
        if words[1] == "train.py":
            return "train.py", [sys.executable, str(ROOT / "train.py")]
        if words[1] == "-m" and len(words) > 2 and f"python -m {words[2]}" not in FOREIGN:
            module = words[2]
            if module in SUBCOMMANDS and len(words) > 3 and not words[3].startswith("-"):
                return f"python -m {module} {words[3]}", [sys.executable, "-m", module, words[3]]
            if module.split(".")[0] in ("fastgpt", "fastgpt_kernels", "bench"):
                return f"python -m {module}", [sys.executable, "-m", module]
    return None


def _argv(name: str) -> list[str]:
    """The argv prefix of a documented program; an installed command's path beside this Python (where
    pip puts scripts), else on PATH."""
    argv = COMMANDS[name]["argv"]
    if not name.startswith("fastgpt-"):
        return argv
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: `pip install -e .` makes it"
    return [found]


def documented_commands() -> dict[str, dict]:
    """Per program: its argv prefix, every option the docs give it (with where), and the command lines
    that carry --dry-run."""
    programs: dict[str, dict] = {}
    for doc in DOCS:
        for snippet in _snippets(doc.read_text()):
            for command in re.split(r"&&|\|\||;|\|", snippet):
                try:
                    words = shlex.split(command, comments=True)
                except ValueError:  # prose in backticks with an odd quote
                    continue
                found = _program(words)
                if found is None:
                    continue
                name, argv = found
                entry = programs.setdefault(name, {"argv": argv, "options": {}, "dry_runs": set()})
                args = words[words.index(name.split()[-1]) + 1:]
                args = args[:args.index("--")] if "--" in args else args  # after it: a wrapped command's
                for word in args:
                    if word.startswith("--"):
                        entry["options"].setdefault(word.split("=")[0], doc.name)
                if "--dry-run" in args:
                    entry["dry_runs"].add(tuple(args))
    return programs


COMMANDS = documented_commands()


def _env(argv: list[str]) -> dict:
    env = dict(os.environ)
    if argv[1:2] == ["-m"] and argv[2].startswith("bench"):  # bench is not installed: it runs from a checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@functools.cache
def _help(name: str, cwd: str) -> str:
    argv = _argv(name)
    result = subprocess.run([*argv, "--help"], cwd=cwd, env=_env(argv), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{name} --help failed:\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_docs_show_every_installed_command():
    assert {"fastgpt-train", "fastgpt-sample", "fastgpt-prepare", "fastgpt-verify",
            "fastgpt-compile-report", "train.py", "python -m fastgpt.sample",
            "python -m bench", "python -m bench.gpu_report"} <= set(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_documented_command_takes_its_documented_options(name, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")  # not the checkout: nothing imports from cwd
    text = _help(name, str(outside))
    for option, doc in COMMANDS[name]["options"].items():
        spellings = {option, "--" + option[2:].replace("-", "_")}  # --n-layer is --n_layer
        assert any(re.search(re.escape(s) + r"(?![\w-])", text) for s in spellings), (
            f"{doc} shows `{name} {option}`, which `{name} --help` does not list")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in COMMANDS if COMMANDS[n]["dry_runs"]))
def test_documented_dry_runs_run(name, tmp_path):
    argv = _argv(name)
    for args in COMMANDS[name]["dry_runs"]:
        result = subprocess.run([*argv, *args], cwd=tmp_path, env=_env(argv), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), f"{name} {' '.join(args)} printed nothing"
