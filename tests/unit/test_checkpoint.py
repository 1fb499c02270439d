import json
import logging
import re
from pathlib import Path

import pytest
import torch

from dino.io import checkpoint
from dino.io.checkpoint import CheckpointWriter


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


# --- damaged markers: warned in one line, skipped for the previous complete checkpoint ---------------


def _without(*keys):
    return lambda marker: {k: v for k, v in marker.items() if k not in keys}


def _with(**values):
    return lambda marker: {**marker, **values}


MARKER_DAMAGE = {
    "not json": (b"{not json", "COMPLETE.json is not JSON"),
    "empty file": (b"", "COMPLETE.json is not JSON"),
    "not utf-8": (b"\xff\xfe\x00", "COMPLETE.json is not JSON"),
    "a list": (b"[]", "COMPLETE.json holds list, not an object"),
    "empty object": (b"{}", "COMPLETE.json lacks 'step', 'size', 'sha256'"),
    "no size": (_without("size"), "COMPLETE.json lacks 'size'"),
    "no sha256": (_without("sha256"), "COMPLETE.json lacks 'sha256'"),
    "no step": (_without("step"), "COMPLETE.json lacks 'step'"),
    "size a string": (_with(size="1234"), "COMPLETE.json has size='1234', not a whole number"),
    "size a bool": (_with(size=True), "COMPLETE.json has size=True, not a whole number"),
    "size negative": (_with(size=-1), "COMPLETE.json has size=-1, not a whole number"),
    "size null": (_with(size=None), "COMPLETE.json has size=None, not a whole number"),
    "sha256 a number": (_with(sha256=5), "COMPLETE.json has sha256=5, not a SHA-256 hex digest"),
    "sha256 too short": (_with(sha256="abc"), "COMPLETE.json has sha256='abc', not a SHA-256 hex digest"),
    "step a string": (_with(step="20"), "COMPLETE.json has step='20', not a whole number"),
    "step of another folder": (_with(step=10), "COMPLETE.json says step 10, the folder is step 20"),
}


def _damage_marker(path, damage):
    marker_file = Path(path) / checkpoint.MARKER_FILE
    if callable(damage):
        marker_file.write_text(json.dumps(damage(json.loads(marker_file.read_text()))))
    else:
        marker_file.write_bytes(damage)


@pytest.mark.parametrize("damage, why", MARKER_DAMAGE.values(), ids=MARKER_DAMAGE.keys())
def test_a_damaged_marker_is_warned_and_skipped(tmp_path, caplog, damage, why):
    _save(tmp_path, 10)
    path20 = _save(tmp_path, 20)
    _damage_marker(path20, damage)
    with caplog.at_level(logging.WARNING, logger="dino.checkpoint"):
        latest = checkpoint.load_latest(str(tmp_path))  # no KeyError/TypeError: a warning
    assert latest.step == 10 and torch.equal(latest.state["w"], torch.full((4,), 10.0))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"checkpoint {path20} is corrupt ({why}"), warning
    assert warning.endswith("); skipped for the previous complete one"), warning
    assert "\n" not in warning
    assert not checkpoint.is_complete(path20) and checkpoint.complete_steps(str(tmp_path)) == [10]
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{path20} is corrupt ({why}")):
        checkpoint.load(path20)


# --- a damaged checkpoint is replaced when its step is reached again; a valid one never is ----------


def _truncate_state(path):
    state = Path(path) / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])


def _remove_state(path):
    (Path(path) / checkpoint.STATE_FILE).unlink()


DAMAGE = {
    "truncated state": (_truncate_state, "state.pt has 100 bytes and another checksum"),
    "missing state": (_remove_state, "state.pt is missing"),
    "empty marker": (lambda path: _damage_marker(path, b"{}"), "COMPLETE.json lacks"),
    "marker of another step": (lambda path: _damage_marker(path, _with(step=4)), "says step 4"),
}


@pytest.mark.parametrize("damage, why", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_moved_aside_and_written_again(tmp_path, caplog, damage, why):
    _save(tmp_path, 4)
    path8 = _save(tmp_path, 8)
    damage(path8)
    damaged = {p.name: p.read_bytes() for p in Path(path8).iterdir()}
    assert checkpoint.load_latest(str(tmp_path)).step == 4  # what a resumed run starts from
    caplog.clear()
    new = checkpoint.serialize({"w": torch.full((4,), 80.0)})
    with caplog.at_level(logging.INFO, logger="dino.checkpoint"):
        published = checkpoint.publish(str(tmp_path), 8, new, "hash", keep_last=3)
    assert published == checkpoint.Published(path8, written=True)
    loaded = checkpoint.load(path8)  # valid now, with the new state
    assert loaded.step == 8 and torch.equal(loaded.state["w"], torch.full((4,), 80.0))
    assert checkpoint.load_latest(str(tmp_path)).step == 8
    # nothing deleted: the damaged folder, byte for byte, beside it (and ignored as a checkpoint)
    [aside] = [p for p in (tmp_path / "checkpoints").iterdir() if ".corrupt-" in p.name]
    assert re.fullmatch(r"000000008\.corrupt-\d{8}T\d{6}Z", aside.name)
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == damaged
    assert checkpoint.list_steps(str(tmp_path)) == [4, 8]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"checkpoint {path8} is corrupt (") and why in warning
    assert warning.endswith(f"; moved aside to {aside} and written again")


def test_a_second_damage_in_the_same_second_gets_its_own_name(tmp_path):
    path = _save(tmp_path, 8)
    for _ in range(2):
        _truncate_state(path)
        checkpoint.publish(str(tmp_path), 8, checkpoint.serialize({"w": torch.ones(4)}), "hash", 3)
    asides = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if ".corrupt-" in p.name)
    assert len(asides) == 2 and checkpoint.load(path).step == 8


def test_a_valid_checkpoint_is_kept_byte_for_byte_and_nothing_is_claimed_written(tmp_path, caplog):
    path = _save(tmp_path, 7)
    before = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    other = checkpoint.serialize({"w": torch.zeros(4)})
    with caplog.at_level(logging.INFO, logger="dino.checkpoint"):
        published = checkpoint.publish(str(tmp_path), 7, other, "other", 3)
    assert published == checkpoint.Published(path, written=False)
    assert {p.name: p.read_bytes() for p in Path(path).iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000000007"]
    assert caplog.messages == [f"checkpoint {path} is already complete and valid: kept, nothing written"]


def test_the_writer_logs_only_writes_that_happened(tmp_path, caplog):
    valid = _save(tmp_path, 4)
    damaged = _save(tmp_path, 8)
    _truncate_state(damaged)
    done = []
    writer = CheckpointWriter(str(tmp_path), "hash", 3, lambda step, path: done.append((step, path)))
    with caplog.at_level(logging.INFO, logger="dino.checkpoint"):
        writer.save(4, {"w": torch.zeros(4)})
        writer.wait()
        kept = list(caplog.messages)
        caplog.clear()
        writer.save(8, {"w": torch.zeros(4)})
        writer.close()
    assert kept == [f"checkpoint {valid} is already complete and valid: kept, nothing written"]
    assert caplog.messages[0].startswith(f"checkpoint {damaged} is corrupt (")
    assert re.fullmatch(
        rf"checkpoint {re.escape(damaged)} \(0\.0 MB; .* writing in the background\)", caplog.messages[1]
    )
    assert done == [(4, valid), (8, damaged)] and writer.last_complete == 8
    assert torch.equal(checkpoint.load(valid).state["w"], torch.full((4,), 4.0))
    assert torch.equal(checkpoint.load(damaged).state["w"], torch.zeros(4))


# --- pruning around damaged checkpoints -----------------------------------------------------------


def test_pruning_ignores_a_damaged_checkpoint_newer_than_the_one_just_written(tmp_path):
    # A run resumed from 4 below a damaged 12 saves 8 (every few minutes) with keep_last=1: the
    # damaged 12 must not count as "the newest", or 8, the only good checkpoint, would be pruned.
    _save(tmp_path, 4)
    _truncate_state(_save(tmp_path, 12))
    _save(tmp_path, 8, keep_last=1)
    assert checkpoint.list_steps(str(tmp_path)) == [8, 12]
    assert checkpoint.load_latest(str(tmp_path)).step == 8


def test_pruning_keeps_a_folder_with_a_damaged_marker(tmp_path):
    # Its state file may be fine: a human may want it. Partial leftovers (no marker) go as before.
    _save(tmp_path, 4)
    _damage_marker(_save(tmp_path, 8), b"{}")
    (tmp_path / "checkpoints" / "000000010").mkdir()
    _save(tmp_path, 12, keep_last=1)
    _save(tmp_path, 16, keep_last=1)
    assert checkpoint.list_steps(str(tmp_path)) == [8, 16]
