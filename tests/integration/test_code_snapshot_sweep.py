"""A sweep's job runs the code it was submitted with (launcher/code_snapshot.py): the real `dinolab sweep
submit` on the local executor from a copy of the source tree, a module of that copy edited after the
submit and before the job starts, and the job trains with the snapshot; resuming its run by hand with
the edited copy is refused, naming both code hashes. The copy, not this checkout, is edited."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dino.config.identity import CODE_PACKAGES, code_hash_of
from launcher import records
from tests.conftest import TINY_OVERRIDES
from tests.integration.cli import REPO

# heavy: a local-executor sweep of its own (~12 s alone, ~45 s beside the quick tier's other workers);
# the quick tier keeps the snapshot's unit tests (tests/unit/test_code_snapshot.py).
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def copy_source(to: Path) -> Path:
    for name in CODE_PACKAGES:
        shutil.copytree(REPO / name, to / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", to)
    return to


def dinolab(src: Path, *args: str) -> subprocess.CompletedProcess:
    """`dinolab` as a user of the copy runs it: from its folder, importing it. Its output goes through
    files: a local job started by `submit` inherits them and outlives it, so pipes would not close."""
    environ = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", HOME=str(src.parent / "home"))
    out, err = src.parent / f"{args[0]}.out", src.parent / f"{args[0]}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], stdout=stdout, stderr=stderr,
                              env=environ, cwd=src, timeout=300)  # fmt: skip
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def test_the_job_imports_the_snapshot_and_a_resume_with_edited_code_is_refused(tmp_path):
    src = copy_source(tmp_path / "src")
    go = tmp_path / "go"
    sweep = tmp_path / "code.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "code", "root": str(tmp_path / "root"), "base": [*TINY_OVERRIDES, "train.progress=false"],
        "grid": {"train.seed": [0]}, "tracking_uri": "none",
        # The job waits here, in its setup, until the test has edited the copy.
        "resources": {"pretrain": {"cpus_per_task": 1, "setup": [f"while [ ! -e {go} ]; do sleep 0.1; done"]}},
    }))  # fmt: skip

    try:
        submit = dinolab(src, "sweep", "submit", str(sweep), "--executor", "local")
        edited = check_snapshot_then_edit(tmp_path, src, submit)
    finally:
        go.touch()  # the job starts, whatever happened: a test never leaves one waiting
    check_job_and_resume(tmp_path, src, edited)


def check_snapshot_then_edit(tmp_path: Path, src: Path, submit: subprocess.CompletedProcess) -> str:
    assert submit.returncode == 0, submit.stdout + submit.stderr
    (snapshot,) = (tmp_path / "root" / "code" / "code").iterdir()
    assert (
        snapshot.name == code_hash_of(src) and f"code {snapshot.name} (snapshot: {snapshot})" in submit.stdout
    )
    source = json.loads((snapshot / "source.json").read_text())
    assert source["code_hash"] == snapshot.name and source["source_dir"] == str(src)

    module = src / "dino" / "run" / "state.py"
    module.write_text(module.read_text() + "# edited after the submit\n")
    edited = code_hash_of(src)
    assert edited != snapshot.name
    return edited


def check_job_and_resume(tmp_path: Path, src: Path, edited: str) -> None:
    (snapshot,) = (tmp_path / "root" / "code" / "code").iterdir()
    (run_dir,) = [p for p in (tmp_path / "root" / "code").iterdir() if p.name.startswith("seed0-")]
    deadline = time.monotonic() + 240
    while records.read_record(str(run_dir)).get("state") not in ("completed", "failed"):
        assert time.monotonic() < deadline, records.read_record(str(run_dir))
        time.sleep(0.5)
    record = records.read_record(str(run_dir))
    assert record["state"] == "completed", record.get("error")
    markers = sorted((run_dir / "checkpoints").glob("*/COMPLETE.json"))
    marker = json.loads(markers[-1].read_text())
    # The job's code hash is that of the packages it imported: the snapshot's, not the edited copy's.
    assert (marker["code_hash"], marker["on_code_change"]) == (snapshot.name, "refuse")

    resume = dinolab(src, "train", *TINY_OVERRIDES, "train.progress=false", f"run.dir={run_dir}")
    assert resume.returncode == 2, resume.stdout + resume.stderr
    (line,) = [line for line in resume.stderr.splitlines() if line.startswith("dinolab train: error: ")]
    assert "Traceback" not in resume.stderr
    assert snapshot.name in line and edited in line and "train.on_code_change=warn" in line, line
