"""python -m fastgpt.plot: runs' metrics drawn side by side; clear errors without matplotlib or with a bad file."""
import json
from pathlib import Path

import pytest

from fastgpt import plot


def write_run(directory, steps=4, hellaswag=False, torn=False):
    directory.mkdir()
    lines = []
    for step in range(steps + 1):
        lines.append({"step": step, "tokens": 64 * step, "loss": 3 - 0.1 * step, "lr": 1e-3, "tokens_per_s": 1e4,
                      "mfu": 0.1})
        if step % 2 == 0:
            lines.append({"step": step, "tokens": 64 * step, "train_loss": 3 - 0.1 * step, "val_loss": 3.1 - 0.1 * step,
                          "train_seconds": 0.5 * step, **({"hellaswag_acc_norm": 0.25 + 0.01 * step} if hellaswag else {})})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (directory / "metrics.jsonl").write_text(text + ('{"step": 5, "lo' if torn else ""))
    return directory


def test_two_runs_are_drawn_into_one_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = write_run(tmp_path / "a", hellaswag=True), write_run(tmp_path / "b", torn=True)  # b is still being written
    assert plot.main([str(a), str(b / "metrics.jsonl"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plot.read_metrics(b)) == 5 + 3  # the torn last line is left out
    assert plot.main([str(a)]) == 0 and (a / "metrics.png").stat().st_size > 0


def test_a_bad_run_or_no_matplotlib_is_said_in_one_line(tmp_path, capsys, monkeypatch):
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl at" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad")
    (bad / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    assert plot.main([str(bad)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    assert plot.main([str(bad)]) == 2
    assert "pip install 'fastgpt[plot]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match="matplotlib"):
        plot.draw({}, tmp_path / "x.png")


def test_the_loops_redrawer_draws_at_most_every_so_often_and_at_the_end(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 4.0}) + "\n")
    now, drawn = [100.0], []
    monkeypatch.setattr(plot.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(plot, "have_matplotlib", lambda: True)  # draw is a stand-in
    monkeypatch.setattr(plot, "draw", lambda runs, path, title: drawn.append((now[0], Path(path).name)))
    redraw = plot.Redrawer(run, 30.0, say=print)
    for t, final in ((100, False), (110, False), (129.9, False), (130, False), (131, True)):
        now[0] = t
        redraw(final)
    assert drawn == [(100, "metrics.png"), (130, "metrics.png"), (131, "metrics.png")]
