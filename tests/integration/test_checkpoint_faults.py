"""Damaged checkpoints as a cluster leaves them, met by the real `dinolab train` (issue 20, items 2-3):
a truncated state file and a marker without its fields are warned about in one line and skipped; the
damaged checkpoint is moved aside and written again when its step is reached, so a later start
resumes from it instead of training the same steps on every restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dino.io import checkpoint, storage
from dino.run.train import run
from tests.conftest import tiny_config
from tests.integration.cli import TINY, dinolab

EVERY_4 = ["train.checkpoint_every_steps=4", "train.workers=0", "train.progress=false"]


def _train(run_dir: Path, max_steps: int):
    proc = dinolab(
        "train", *TINY, *EVERY_4, f"train.max_steps={max_steps}", f"run.dir={run_dir}", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.splitlines()


def _one_line(lines: list[str], text: str) -> str:
    found = [line for line in lines if text in line]
    assert len(found) == 1, f"{text!r} in {found or lines[-30:]}"
    return found[0]


def _metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _aside(run_dir: Path, step: int) -> Path:
    [aside] = (run_dir / "checkpoints").glob(f"{step:09d}.corrupt-*")
    return aside


@pytest.mark.heavy
def test_a_truncated_checkpoint_is_replaced_and_an_empty_marker_is_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    ck4, ck8, ck12 = (checkpoint.checkpoint_path(str(run_dir), s) for s in (4, 8, 12))
    run(tiny_config(run_dir, *EVERY_4, "train.max_steps=8"))  # set-up in this process (saves an import)
    assert checkpoint.complete_steps(str(run_dir)) == [4, 8]

    # A kill during the copy to a shared file system: the newest state file is cut in half.
    state8 = Path(ck8) / "state.pt"
    truncated = state8.read_bytes()[: state8.stat().st_size // 2]
    state8.write_bytes(truncated)
    lines = _train(run_dir, 12)
    warning = _one_line(lines, "skipped for the previous complete one")
    assert warning.endswith(
        f"WARNING dino.checkpoint: checkpoint {ck8} is corrupt (state.pt has {len(truncated)} bytes and "
        "another checksum than its marker says); skipped for the previous complete one"
    ), warning
    assert f"resumed from {ck4} (step 4," in _one_line(lines, "resumed from")
    aside8 = _aside(run_dir, 8)
    assert _one_line(lines, "moved aside").endswith(f"; moved aside to {aside8} and written again")
    assert (aside8 / "state.pt").read_bytes() == truncated  # nothing a human might want is deleted
    _one_line(lines, f"checkpoint {ck8} (")  # the write is logged because it happened
    replaced = checkpoint.load(ck8)
    assert replaced.step == 8 and replaced.state["step"] == 8
    assert checkpoint.complete_steps(str(run_dir)) == [4, 8, 12]

    # A marker that is valid JSON without its fields: a warning line, not a KeyError traceback.
    (Path(ck12) / "COMPLETE.json").write_text("{}")
    trained_before = len(_metric_steps(run_dir))
    lines = _train(run_dir, 12)
    assert _one_line(lines, "skipped for the previous complete one").endswith(
        f"WARNING dino.checkpoint: checkpoint {ck12} is corrupt (COMPLETE.json lacks 'step', 'size', "
        "'sha256'); skipped for the previous complete one"
    )
    # ... and the start resumes from the replaced checkpoint 8: steps 5-8 are not trained again.
    assert f"resumed from {ck8} (step 8," in _one_line(lines, "resumed from")
    assert not [line for line in lines if f"{ck8} is corrupt" in line]
    new_steps = _metric_steps(run_dir)[trained_before:]
    assert new_steps and min(new_steps) > 8 and max(new_steps) == 12, new_steps
    assert (_aside(run_dir, 12) / "COMPLETE.json").read_text() == "{}"
    rewritten = checkpoint.load(ck12)
    assert rewritten.step == 12 and rewritten.state["step"] == 12


def test_a_damaged_checkpoint_is_replaced_on_an_object_store_too(store_root):
    path8 = checkpoint.save(store_root, 8, {"w": torch.ones(4)}, "h", keep_last=3)
    state8 = storage.join(path8, "state.pt")
    storage.atomic_write_bytes(state8, b"cut")
    assert checkpoint.load_latest(store_root) is None  # skipped, with a warning
    published = checkpoint.publish(store_root, 8, checkpoint.serialize({"w": torch.zeros(4)}), "h", 3)
    assert published.written and torch.equal(checkpoint.load(path8).state["w"], torch.zeros(4))
    asides = [n for n in storage.listdir(checkpoint.checkpoints_root(store_root)) if ".corrupt-" in n]
    assert len(asides) == 1 and checkpoint.list_steps(store_root) == [8]
    aside = storage.join(checkpoint.checkpoints_root(store_root), asides[0])
    assert storage.read_bytes(storage.join(aside, "state.pt")) == b"cut"
    assert storage.exists(storage.join(aside, "COMPLETE.json"))
