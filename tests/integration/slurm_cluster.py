"""The `slurm_cluster` fixture: the real local cluster of tools/slurm/slurm-local.sh.

One machine, three slurmd: node `localhost` (partitions `debug`, default, and `urgent`, which
preempts `debug`) and nodes `n1`, `n2` (127.0.0.2, 127.0.0.3, in /etc/hosts; partitions `multi` and
`multi-urgent`, which preempts `multi`) for multi-node jobs.

Import it into a test module with `from tests.integration.slurm_cluster import slurm_cluster`.

- Not root, or no `sbatch`: the tests are skipped (a cluster already running is used even when not
  root), unless DINOLAB_REQUIRE_SLURM is set or CI=true: then they fail (tests/parts.py).
- Otherwise the fixture runs `tools/slurm/slurm-local.sh start` (a no-op when it already runs; the
  packages must be installed: `slurm-local.sh install`, CI's job) and never stops the cluster, so
  repeated local runs stay fast. CI stops it with `slurm-local.sh stop`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.parts import missing

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm" / "slurm-local.sh"
NODE = "localhost"  # partitions debug, urgent
MULTI_NODES = ("n1", "n2")  # partitions multi, multi-urgent
SPARE_NODE = "n3"  # with n1, n2: partition multi-spare (a job that excludes a node still finds two)
NODES = (NODE, *MULTI_NODES, SPARE_NODE)

# Job states after which a job does not run again. Not PREEMPTED: here (PreemptMode=REQUEUE) a
# preempted job goes back to PENDING.
TERMINAL = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "REVOKED",
        "TIMEOUT",
    }
)


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _clean(state: str) -> str:
    # sacct writes "CANCELLED by 0"; squeue can append "+" (e.g. "COMPLETING+").
    return state.split()[0].rstrip("+") if state.strip() else ""


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running cluster, with polling helpers for job states."""

    partitions: tuple[str, ...] = ("debug", "urgent")  # on `node` only
    node: str = NODE
    cpus: int = 0  # CPUs the node advertises (all of them: request these to fill the node)
    memory_mb: int = 0
    # Multi-node jobs: two nodes (their own slurmd, on 127.0.0.2 and 127.0.0.3; names in /etc/hosts,
    # so e.g. MASTER_ADDR=n1 works). Jobs there get whole nodes; a job in `multi_urgent_partition`
    # preempts the `multi_partition` job on its nodes (its --signal at once, requeued after
    # GraceTime=30 unless it requeues itself, as submitit does).
    multi_nodes: tuple[str, ...] = MULTI_NODES
    multi_partition: str = "multi"
    multi_urgent_partition: str = "multi-urgent"
    multi_cpus: int = 0  # CPUs of each multi node (a multi job gets them all: whole nodes)

    def squeue(self, job_id: str | int) -> str | None:
        """The controller's live state of a job (e.g. "RUNNING"), None if it does not know it."""
        proc = _run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T")
        lines = proc.stdout.split()
        return _clean(lines[0]) if proc.returncode == 0 and lines else None

    def _sacct(self, job_id: str | int, duplicates: bool) -> list[str]:
        cmd = ["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State"]
        proc = _run(*cmd, *(["-D"] if duplicates else []))
        if proc.returncode != 0:
            return []
        return [_clean(line) for line in proc.stdout.splitlines() if line.strip()]

    def _sacct_caught_up(self, job_id: str | int, duplicates: bool, wait: float) -> list[str]:
        """sacct rows once accounting agrees with the controller: sacct lags a second or two
        behind it (a job that just ended can still read RUNNING). Polls up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            rows = self._sacct(job_id, duplicates)
            live = self.squeue(job_id)  # None once the controller forgot the job (MinJobAge)
            if rows and (live is None or rows[-1] == live):
                return rows
            if time.monotonic() >= deadline:
                return rows
            time.sleep(0.3)

    def sacct_state(self, job_id: str | int, wait: float = 10.0) -> str | None:
        """The job's state in accounting, once it has caught up with the controller (polls up to
        `wait` seconds, then answers what it has). None if accounting does not know the job."""
        rows = self._sacct_caught_up(job_id, False, wait)
        return rows[-1] if rows else None

    def sacct_history(self, job_id: str | int, wait: float = 10.0) -> list[str]:
        """Every state the job's allocations ended in, oldest first (`sacct --duplicates`), once
        accounting has caught up: a requeued job shows e.g. ["REQUEUED", "COMPLETED"]."""
        return self._sacct_caught_up(job_id, True, wait)

    def state(self, job_id: str | int) -> str | None:
        """Live state from the controller, falling back on accounting."""
        return self.squeue(job_id) or self.sacct_state(job_id, wait=0)

    def wait_state(self, job_id: str | int, states: str | Iterable[str], timeout: float = 60) -> str:
        """Poll until the job is in one of `states` and return that state. Fails at once if the job
        ends in another terminal state, and after `timeout` seconds with the last state seen."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL:
                raise AssertionError(f"job {job_id} ended {state}, waiting for {sorted(wanted)}")
            time.sleep(0.3)
        raise AssertionError(
            f"job {job_id} still {state} after {timeout:.0f} s, waiting for {sorted(wanted)}"
        )


def _require() -> bool:
    return os.environ.get("DINOLAB_REQUIRE_SLURM", "") not in ("", "0")


def _unavailable(reason: str):
    missing("SLURM", reason, required=_require())


def _slurmctld_running() -> bool:
    # Cheap check first: with no controller, sinfo retries for ~10 s before it fails.
    try:
        pid = int(Path("/run/slurmctld.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def _nodes_ready() -> bool:
    """Whether every node (localhost, n1, n2) accepts jobs."""
    if not _slurmctld_running():
        return False
    try:
        proc = _run("sinfo", "-h", "-N", "-n", ",".join(NODES), "-o", "%N %T", timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if proc.returncode != 0:
        return False
    # One line per node and partition; a node missing from the config is missing here.
    states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
    ready = {"idle", "mixed", "allocated", "completing"}
    return all(_clean(states.get(node, "")) in ready for node in NODES)


def _node_resources(node: str = NODE) -> tuple[int, int]:
    proc = _run("sinfo", "-h", "-N", "-n", node, "-o", "%c %m")
    cpus, mem = proc.stdout.split()[:2]
    return int(cpus), int(mem.rstrip("+"))


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("sbatch") is None:
        _unavailable(f"SLURM is not installed (no sbatch): run `sudo {SCRIPT} install start`")
    if os.geteuid() != 0:
        if not _nodes_ready():
            _unavailable(f"not root, so cannot start the local SLURM cluster: run `sudo {SCRIPT} start`")
    else:
        try:
            proc = subprocess.run(
                [str(SCRIPT), "start"], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            _unavailable(f"`{SCRIPT} start` did not finish in 180 s")
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()[-3000:]
            _unavailable(f"`{SCRIPT} start` failed (exit {proc.returncode}):\n{output}")
        if not _nodes_ready():
            _unavailable(f"`{SCRIPT} start` succeeded but nodes {', '.join(NODES)} are not all up (sinfo)")
    cpus, memory_mb = _node_resources()
    multi_cpus, _ = _node_resources(MULTI_NODES[0])
    yield SlurmCluster(cpus=cpus, memory_mb=memory_mb, multi_cpus=multi_cpus)
    # The cluster keeps running: CI stops it with `slurm-local.sh stop`.
