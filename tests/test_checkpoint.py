"""fastgpt.checkpoint: atomic writes, round trips, and clear errors for files that are not checkpoints."""
import os
import stat

import pytest
import torch

from fastgpt import checkpoint


def state(step=3):
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "model_config": {"n_layer": 2}, "step": step,
            "rng": torch.get_rng_state()}


def test_round_trip(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt" / "last.pt", state())
    loaded = checkpoint.load(path)
    assert loaded["step"] == 3 and loaded["model_config"] == {"n_layer": 2}
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded["rng"], torch.get_rng_state())


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "last.pt", state(step=1))

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, state(step=2))
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope.pt"):
        checkpoint.load(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text\n")
    with pytest.raises(ValueError, match="notes.txt is not a readable fastgpt checkpoint"):
        checkpoint.load(path)


def test_truncated_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "last.pt", state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="last.pt is not a readable fastgpt checkpoint"):
        checkpoint.load(path)


def test_other_pytorch_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="weights.pt is a PyTorch file but not a fastgpt checkpoint"):
        checkpoint.load(path)


def test_incomplete_state_is_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="missing model_config, step"):
        checkpoint.save(tmp_path / "x.pt", {"model": {}})


def test_written_files_get_the_permissions_of_any_new_file(tmp_path):
    mask = os.umask(0o027)
    try:
        path = checkpoint.save(tmp_path / "last.pt", state())
        with checkpoint.atomic_writer(tmp_path / "data.bin") as f:
            f.write(b"\x01\x02")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "data.bin").stat().st_mode) == 0o640
    assert (tmp_path / "data.bin").read_bytes() == b"\x01\x02"
