"""A disk that fills up under a real `dinolab train`, `eval` and `sweep submit` (issue 20, item 4).

The full disk is real: a 16 MiB tmpfs mounted for the test (root with CAP_SYS_ADMIN, as in CI and on
our machines; skipped with the reason otherwise), filled by a file written until ENOSPC. Every write
the run makes then fails the way it would on a cluster's scratch space: each command ends with one
line naming what could not be written (training also names the newest complete checkpoint), exit
code 2, no `*.tmp-*` left, no checkpoint folder without its marker, and metrics.jsonl ends on a whole
line; after space is freed the same command resumes from that checkpoint."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dino.io import checkpoint
from tests.integration.cli import DINOLAB, REPO, TINY, dinolab, env
from tests.parts import missing

pytestmark = [pytest.mark.slow, pytest.mark.root]
SIZE = "16m"  # two tiny checkpoints (2.5 MB each) and the logs fit; the filler takes the rest
TRAIN = [*TINY, "optim.epochs=50", "train.checkpoint_every_steps=4", "train.log_every=1",
         "train.keep_last=2", "train.workers=0", "train.progress=false"]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        missing(
            "a tmpfs to fill", f"cannot mount one here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the file system refuses (ENOSPC); return it (delete it to free the space)."""
    filler = disk / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {count} lines")


def assert_nothing_half_written(disk: Path) -> None:
    leftovers = [p for p in disk.rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], leftovers
    for folder in disk.rglob("checkpoints/[0-9]*"):
        assert (folder / checkpoint.MARKER_FILE).exists(), f"{folder} has no marker: a partial copy was left"


def test_a_disk_that_fills_during_training_stops_it_in_one_line_and_the_same_command_resumes(small_disk):
    run_dir = small_disk / "run"
    command = [*DINOLAB, "train", *TRAIN, f"run.dir={run_dir}"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    try:
        wait_for_lines(run_dir / "metrics.jsonl", 10, proc)  # two checkpoints are written by now
        filler = fill(small_disk)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr[-3000:]
    newest = checkpoint.complete_steps(str(run_dir))[-1]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"dinolab train: error: cannot write {run_dir}/"), last
    assert last.endswith(
        f": No space left on device. The newest complete checkpoint is step {newest} "
        f"({checkpoint.checkpoint_path(str(run_dir), newest)}); free space and run the same command "
        "again to resume from it."
    ), last
    assert_nothing_half_written(small_disk)
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    steps = [json.loads(line)["step"] for line in text.splitlines()]  # every line whole
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= newest

    os.remove(filler)
    resumed = dinolab("train", *TRAIN, f"run.dir={run_dir}", f"train.max_steps={newest + 8}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from {checkpoint.checkpoint_path(str(run_dir), newest)} (step {newest}," in resumed.stderr
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == newest + 8
    assert checkpoint.complete_steps(str(run_dir))[-1] == newest + 8


def test_evaluation_and_sweep_records_on_a_full_disk_name_the_file(small_disk, tmp_path):
    run_dir = small_disk / "run"
    proc = dinolab("train", *TINY, "train.workers=0", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fill(small_disk)

    proc = dinolab("train", *TINY, "train.workers=0", f"run.dir={small_disk / 'new'}")  # started full
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dinolab train: error: cannot write {small_disk / 'new' / 'LOCK'}: No space left on device. There "
        "is no complete checkpoint yet; the same command starts the run again once it can write."
    )

    proc = dinolab("eval", "knn", f"run.dir={run_dir}", "workers=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dinolab eval: error: cannot write {run_dir}/eval/"), last
    assert last.endswith(": No space left on device"), last

    sweep = tmp_path / "full.yaml"
    sweep.write_text(
        "name: full\n"
        f"root: {small_disk / 'sweeps'}\n"
        f"base: [{', '.join(TINY)}]\n"
        "grid: {teacher.momentum: [0.996, 0.9]}\n"
        "resources: {pretrain: {cpus_per_task: 1, mem_gb: 2, timeout_min: 10}}\n"
    )
    proc = dinolab("sweep", "submit", str(sweep), "tracking_uri=none")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    # The code snapshot is the submission's first write (launcher/code_snapshot.py): it names its folder.
    assert last.startswith(
        f"dinolab sweep: error: cannot snapshot the dinolab code into {small_disk}/sweeps/full/code:"
    ), last
    assert "No space left on device" in last, last
    assert not list((small_disk / "sweeps" / "full" / "code").iterdir())  # the partial copy is gone
    assert_nothing_half_written(small_disk)
