"""The collapse guard through the real `dinolab train`: a collapsing tiny run stops early, exits 0 with
a final checkpoint and the decision in its folder; started again it says so instead of training;
`train.collapse_stop=false` trains it on."""

from __future__ import annotations

import json

from dino.io import checkpoint
from tests.conftest import tiny_config
from tests.integration.cli import TINY, dinolab

# No centring and no momentum teacher (head K = 64, lr 0.05): the teacher goes to one dimension by
# step 4 (entropy 0.000, KL 0.005) and stays there. 16 steps planned; windows of 2 steps.
COLLAPSING = [
    "head.out_dim=64", "teacher.momentum=0", "teacher.center_momentum=1", "optim.lr=0.05",
    "optim.warmup_epochs=0", "train.log_every=2", "train.collapse_patience_steps=6", "train.workers=0",
]  # fmt: skip


def test_a_collapsing_run_stops_with_a_final_checkpoint_and_stays_stopped(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = dinolab("train", *TINY, *COLLAPSING, f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # signal from the window starting at step 2, 6 steps of patience: stopped at step 8 of 16
    assert proc.stdout.startswith("collapsed: stopped at step 8/16 in "), proc.stdout
    assert "train.collapse_stop=false" in proc.stdout
    (warning,) = [line for line in proc.stderr.splitlines() if "WARNING" in line and "collapsed" in line]
    assert "teacher output collapsed (one dimension: entropy 0.000 < 0.05 ln K" in warning
    assert "run stopped at step 8 of 16 with a final checkpoint" in warning
    decision = json.loads((run_dir / "collapsed.json").read_text())
    assert (decision["step"], decision["kind"], decision["total_steps"]) == (8, "one dimension", 16)
    assert decision["kl"] <= 0.01 and decision["signal"].startswith("one dimension: entropy 0.000")
    assert checkpoint.complete_steps(str(run_dir)) == [8]  # the final checkpoint is the stop step's
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert json.loads(metrics.splitlines()[-1])["step"] == 8

    # Started again (in this process: the same `dinolab train` entry point, without a second start-up).
    from launcher.cli import main

    capsys.readouterr()
    assert main(["train", *TINY, *COLLAPSING, f"run.dir={run_dir}"]) == 0
    again = capsys.readouterr()
    assert "collapsed at step 8 (one dimension" in again.err and "train.collapse_stop=false" in again.err
    assert again.out.startswith("collapsed: stopped at step 8/16")
    assert checkpoint.complete_steps(str(run_dir)) == [8]
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained

    # Turned off, the guard's decision is dropped and the same run (same id) trains to its end.
    from dino.run.train import run

    result = run(tiny_config(run_dir, *COLLAPSING, "train.collapse_stop=false"))
    assert result.finished and result.resumed_from == 8 and result.collapsed is None
    assert not (run_dir / "collapsed.json").exists()
    assert checkpoint.complete_steps(str(run_dir))[-1] == 16
