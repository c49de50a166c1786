"""docs/reproduce.md: its scaled-down run, as written, from a directory outside the checkout."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduce.md"
SECTION = "## The same on a CPU, in minutes"


def small_run() -> str:
    """The bash block of the page's scaled-down section."""
    text = PAGE.read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_small_run_takes_the_full_runs_commands():
    # The same programs in the same order: only sizes, counts and names differ.
    text = PAGE.read_text()
    full, small = text[:text.index(SECTION)], small_run()
    programs = r"^ *(fastgpt-prepare|torchrun|python -m fastgpt\.\w+ ?\w*|python -c \"from fastgpt)"
    assert [m.group(1) for m in re.finditer(programs, small, re.M)] == \
           [m.group(1) for m in re.finditer(programs, full, re.M)]
    assert "-m fastgpt.train --preset gpt2-124m" in small and "--hellaswag hellaswag_val.jsonl" in small


@pytest.mark.slow
def test_the_small_run_runs_as_written(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    bin_dir = str(Path(sys.executable).parent)  # python, torchrun and the fastgpt commands
    if not (Path(bin_dir) / "fastgpt-prepare").exists():
        pytest.skip("the fastgpt commands are not installed beside this Python: pip install -e .")
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    for name in ("PYTHONPATH", "TRITON_INTERPRET", "FASTGPT_AUTOTUNE_CACHE", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)  # the test suite's settings: the run is a user's
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", small_run()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "2"  # transformers read the two-layer export
    meta = json.loads((tmp_path / "data" / "edu-small" / "meta.json").read_text())
    assert [s["format"] for s in meta["sources"]] == ["parquet", "parquet"] and meta["splits"]["val"]["tokens"] > 0
    records = [json.loads(line) for line in (tmp_path / "out" / "gpt2-small" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in scored] == [0, 20, 40]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0]
    result = json.loads((tmp_path / "hellaswag.json").read_text())
    assert result["examples"] == 24 and 0 <= result["acc_norm"] <= 1
    assert (tmp_path / "out" / "gpt2-small" / "metrics.png").stat().st_size > 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "gpt2-small-hf").iterdir()}
