import logging

import pytest
import torch

from dino import checkpoint


def _save(run_dir, step, keep_last=3):
    return checkpoint.save(str(run_dir), step, {"w": torch.full((4,), float(step))}, "hash", keep_last)


def test_latest_complete_skips_partial_and_corrupt(tmp_path, caplog):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    # 30: truncated state file (a kill during the copy to a shared filesystem)
    state30 = tmp_path / "checkpoints" / "000000030" / "state.pt"
    state30.write_bytes(state30.read_bytes()[:20])
    # 40: folder without marker (the save was interrupted)
    (tmp_path / "checkpoints" / "000000040").mkdir()
    (tmp_path / "checkpoints" / "000000040" / "state.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="dino.checkpoint"):
        latest = checkpoint.load_latest(str(tmp_path))
    assert latest.step == 20 and torch.equal(latest.state["w"], torch.full((4,), 20.0))
    text = caplog.text
    assert "000000040 is partial (no COMPLETE.json marker" in text
    assert "000000030 is corrupt" in text


def test_loading_an_incomplete_checkpoint_by_path_is_refused(tmp_path):
    (tmp_path / "checkpoints" / "000000005").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="is partial"):
        checkpoint.load(str(tmp_path / "checkpoints" / "000000005"))


def test_keep_last_prunes_only_after_a_newer_complete_one(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep_last=2)
    assert checkpoint.list_steps(str(tmp_path)) == [4, 5]


def test_a_complete_checkpoint_is_never_overwritten(tmp_path):
    path = _save(tmp_path, 7)
    checkpoint.save(str(tmp_path), 7, {"w": torch.zeros(4)}, "other", 3)
    assert torch.equal(checkpoint.load(path).state["w"], torch.full((4,), 7.0))


def test_no_temporary_files_are_left_behind(tmp_path):
    _save(tmp_path, 1)
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "000000001").iterdir())
    assert names == ["COMPLETE.json", "state.pt"]
