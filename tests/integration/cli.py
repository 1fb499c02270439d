"""Helpers to run the real `dinolab` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
DINOLAB = [sys.executable, "-m", "launcher.cli"]

TINY = TINY_OVERRIDES


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def dinolab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DINOLAB, *args], capture_output=True, text=True, env=env(), timeout=timeout, cwd=REPO
    )


def results(run_dir: Path, protocol: str) -> dict[str, dict]:
    """The result JSONs an evaluation wrote under <run>/eval/<protocol>/, by file name."""
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "eval" / protocol).glob("*.json")}


def assert_equals_torchrun_reference(run_dir: Path, ref_dir: Path, overrides: list[str], steps: int) -> None:
    """Train `overrides` uninterrupted as one node with 2 processes (torchrun) into `ref_dir`; the
    run in `run_dir` must end at the same step with bitwise equal student and teacher weights."""
    import torch

    from tests.conftest import load_final

    ref = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *DINOLAB[1:],
         "train", *overrides, f"run.dir={ref_dir}"],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = load_final(ref_dir), load_final(run_dir)
    assert a["step"] == b["step"] == steps
    for part in ("student", "teacher"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
