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
