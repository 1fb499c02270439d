"""Two `dinolab train` on one run folder (issue 20, item 1): exactly one trains, the other is refused
with a line naming the holder or waits for it; every checkpoint and every metric line stays whole.

Real processes started at the same instant (Popen back to back: both race for the lock within a
fraction of their ~5 s start-up), several rounds on one run folder, each round resuming the last."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino.io import checkpoint
from tests.integration.cli import DINOLAB, REPO, TINY, env

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def start(run_dir: Path, *extra: str, environ: dict[str, str] | None = None) -> subprocess.Popen:
    args = [*DINOLAB, "train", *TINY, "train.workers=0", "train.checkpoint_every_steps=4", "train.log_every=1", f"run.dir={run_dir}",
            *extra]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=environ or env())  # fmt: skip


def verify(run_dir: Path, last_step: int) -> None:
    """Every complete checkpoint loads (size and SHA-256 match its marker) and the metrics hold each
    step once, in order, as whole lines."""
    steps = checkpoint.complete_steps(str(run_dir))
    assert steps and steps[-1] == last_step, steps
    for step in steps:
        checkpoint.load(checkpoint.checkpoint_path(str(run_dir), step))
    assert not [p for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()], "stray files"
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, last_step + 1))


def test_two_trainers_started_together_one_trains_the_other_is_refused(tmp_path):
    # 1,536 images: 192 steps an epoch, 384 in all, in 4 rounds of 96 steps (seconds of training,
    # far more than the start-up skew of two processes started together: the loser always meets the
    # winner still training).
    run_dir, longer = tmp_path / "run", "data.num_samples=1536"
    for round_, max_steps in enumerate((96, 192, 288, 384)):
        procs = [start(run_dir, longer, f"train.max_steps={max_steps}") for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 2], (round_, codes, [o[1][-1500:] for o in outs])
        refused = next(err for (_, err), p in zip(outs, procs, strict=True) if p.returncode == 2)
        assert f"dinolab train: error: {run_dir} is being trained by another process: pid " in refused
        assert "since" in refused and "Traceback" not in refused
        verify(run_dir, max_steps)
    assert (run_dir / "LOCK").exists()  # kept (it is a lock, not a marker): free now
    lock = json.loads((run_dir / "LOCK").read_text())
    assert {"host", "pid", "since", "token"} <= set(lock)


HOLDER = (
    "import sys, time, pathlib\n"
    "from dino.io.run_lock import RunLock\n"
    "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True)\n"
    "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.1)\n"
)


def hold(run_dir: Path, release: Path, **environ: str) -> subprocess.Popen:
    """Another process holding the run folder's lock until `release` exists (an old allocation
    finishing its last checkpoint, a user's run by hand)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(release)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**env(), **environ})  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def wait_for_text(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(
        f"{text!r} not in {path} after {timeout} s: {path.read_text()[-1500:] if path.exists() else ''}"
    )


def start_logged(
    run_dir: Path, log: Path, *extra: str, environ: dict[str, str] | None = None
) -> subprocess.Popen:
    args = [*DINOLAB, "train", *TINY, "train.workers=0", "train.checkpoint_every_steps=4", "train.log_every=1", f"run.dir={run_dir}",
            *extra]  # fmt: skip
    with open(log, "w") as err:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=environ or env())


def test_wait_for_lock_waits_for_the_holder_then_trains(tmp_path):
    run_dir, release, log = tmp_path / "run", tmp_path / "release", tmp_path / "train.err"
    holder = hold(run_dir, release)
    waiting = start_logged(run_dir, log, "train.wait_for_lock=true")
    wait_for_text(log, f"{run_dir} is being trained by pid {holder.pid} on ")
    assert "waiting for it" in log.read_text()
    time.sleep(2)
    assert (
        waiting.poll() is None and not (run_dir / "metrics.jsonl").exists()
    )  # nothing written while waiting
    release.touch()
    assert holder.wait(30) == 0 and waiting.wait(300) == 0, log.read_text()[-1500:]
    verify(run_dir, 16)


def test_a_requeue_of_the_same_slurm_job_waits_for_its_previous_allocation(tmp_path):
    """A requeued job's new allocation can start while the old one still runs (a node that stopped
    answering). Same SLURM job id: it waits instead of failing; another job is refused, naming it."""
    run_dir, release = tmp_path / "run", tmp_path / "release"
    old = hold(run_dir, release, SLURM_JOB_ID="777")
    other = subprocess.run(
        [*DINOLAB, "train", *TINY, "train.workers=0", f"run.dir={run_dir}"], capture_output=True, text=True,
        cwd=REPO, env={**env(), "SLURM_JOB_ID": "778"}, timeout=300,
    )  # fmt: skip
    assert other.returncode == 2 and f"pid {old.pid} on " in other.stderr and "SLURM job 777" in other.stderr
    log = tmp_path / "requeued.err"
    requeued = start_logged(
        run_dir, log, environ={**env(), "SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"}
    )
    wait_for_text(log, "waiting for it")
    assert "SLURM job 777" in log.read_text()
    release.touch()
    assert old.wait(30) == 0 and requeued.wait(300) == 0, log.read_text()[-1500:]
    verify(run_dir, 16)
    assert not (run_dir / "record.json").exists()  # dinolab train by hand keeps no launcher record
