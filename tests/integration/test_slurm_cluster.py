"""Real SLURM jobs through submitit on the local cluster (tools/slurm/slurm-local.sh): job arrays,
preemption of a `debug` job by an `urgent` one, with checkpoint, requeue and resume, and 2-node
steps in the `multi` partition (one task per node, torch.distributed gloo across the nodes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from tests.integration.slurm_cluster import REPO, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def _executor(folder: Path, partition: str, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=partition,
        mem_gb=1,
        # Jobs unpickle functions and classes from this module: make `tests` importable.
        slurm_setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"],
        **params,
    )
    return executor


def _cancel(*jobs: submitit.Job) -> None:
    """Leave no job behind to block the node for the next tests (no-op for finished ones)."""
    subprocess.run(["scancel", *(job.job_id for job in jobs)], capture_output=True, check=False)


def _square(x: int) -> tuple[int, str, str]:
    return x * x, os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SLURM_JOB_PARTITION"]


def test_map_array(slurm_cluster, tmp_path):  # noqa: F811
    executor = _executor(
        tmp_path / "jobs", "debug", timeout_min=5, cpus_per_task=1, slurm_array_parallelism=2
    )
    jobs = executor.map_array(_square, [3, 4])
    try:
        assert len(jobs) == 2
        assert [job.result() for job in jobs] == [(9, "0", "debug"), (16, "1", "debug")]
        for job in jobs:
            assert slurm_cluster.sacct_state(job.job_id) == "COMPLETED", job.stderr()
    finally:
        _cancel(*jobs)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")


class Progress(submitit.helpers.Checkpointable):
    """Counts to `total`, one "step i" line per step in `path`, resuming from the file: its state.

    Returns the step it (last) started from. submitit calls `checkpoint()` on USR2 (preemption):
    the default resubmits the same call, which then resumes from the file."""

    def __call__(self, path: str, total: int, step_s: float) -> int:
        file = Path(path)
        done = sum(line.startswith("step ") for line in _lines(file))
        _append(file, f"start {done} job {os.environ['SLURM_JOB_ID']}")
        for i in range(done, total):
            time.sleep(step_s)
            _append(file, f"step {i}")
        return done

    def checkpoint(self, path: str, total: int, step_s: float) -> submitit.helpers.DelayedSubmission:
        _append(Path(path), "checkpoint")
        return super().checkpoint(path, total, step_s)


def _fill_node(seconds: float) -> str:
    time.sleep(seconds)
    return os.environ["SLURM_JOB_PARTITION"]


def test_urgent_job_preempts_debug_job(slurm_cluster, tmp_path):  # noqa: F811
    progress, total = tmp_path / "progress.txt", 30
    # timeout_min=60: submitit treats a USR2 before 80 % of the time limit as a preemption. With a
    # short limit (<= 50 min) it would count it as a timeout, against slurm_max_num_timeout.
    debug = _executor(tmp_path / "debug", "debug", timeout_min=60, cpus_per_task=1)
    urgent = _executor(tmp_path / "urgent", "urgent", timeout_min=5, cpus_per_task=slurm_cluster.cpus)
    job = debug.submit(Progress(), str(progress), total, 0.5)
    jobs = [job]
    try:
        slurm_cluster.wait_state(job.job_id, "RUNNING", timeout=30)
        deadline = time.monotonic() + 30
        while sum(line.startswith("step ") for line in _lines(progress)) < 3:
            assert time.monotonic() < deadline, f"no progress from job {job.job_id}: {_lines(progress)}"
            time.sleep(0.2)

        # All the node's CPUs in the higher-priority partition: the debug job must make room.
        big = urgent.submit(_fill_node, 3)
        jobs.append(big)
        assert big.result() == "urgent"
        assert slurm_cluster.wait_state(job.job_id, "COMPLETED", timeout=90) == "COMPLETED"
        resumed_from = job.result()
    finally:
        _cancel(*jobs)

    lines = _lines(progress)
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    starts = [line for line in lines if line.startswith("start ")]
    assert steps == list(range(total)), lines  # every step once: the state was continued
    assert len(starts) == 2, lines
    assert "checkpoint" in lines[lines.index(starts[0]) : lines.index(starts[1])], lines
    assert 3 <= resumed_from < total, lines
    history = slurm_cluster.sacct_history(job.job_id)
    assert history[-1] == "COMPLETED", history
    assert {"REQUEUED", "PREEMPTED"} & set(history[:-1]), history


def _srun(cluster, *cmd: str, env: dict[str, str] | None = None, timeout: float = 60) -> list[str]:
    """`srun -N2 -n2` in the multi partition, one task per node; the tasks' output lines, sorted.
    On a timeout the step is cancelled (a killed srun would leave its allocation behind)."""
    name = f"dinolab-test-multi-{os.getpid()}"
    args = ["srun", "-N2", "-n2", "--ntasks-per-node=1", "--time=2", "--export=ALL"]
    args += [f"--partition={cluster.multi_partition}", f"--job-name={name}", *cmd]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name], capture_output=True, check=False)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"srun did not finish in {timeout:.0f} s:\n{out}\n{err}") from None
    assert proc.returncode == 0, f"srun failed (exit {proc.returncode}):\n{out}\n{err}"
    return sorted(line for line in out.splitlines() if line.strip())


@pytest.mark.xdist_group("slurm-multi")  # n1, n2 only
def test_multi_partition_runs_one_task_per_node(slurm_cluster):  # noqa: F811
    assert slurm_cluster.multi_nodes == ("n1", "n2")
    lines = _srun(slurm_cluster, "bash", "-c", 'echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS"')
    assert lines == ["n1 0 2", "n2 1 2"]


_ALL_REDUCE = """
import datetime, os
import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
x = torch.tensor([float(rank + 1)])
dist.all_reduce(x)
print(os.environ["SLURMD_NODENAME"], rank, world, int(x.item()), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.xdist_group("slurm-multi")  # n1, n2 only
def test_gloo_all_reduce_across_two_nodes(slurm_cluster):  # noqa: F811
    """The way a 2-node training job starts: rank/world from SLURM, rank 0 (on n1) the master."""
    python = REPO / ".venv" / "bin" / "python"
    env = {
        "MASTER_ADDR": slurm_cluster.multi_nodes[0],  # n1 (127.0.0.2, /etc/hosts)
        "MASTER_PORT": str(_free_port()),
        # gloo's own sockets: on loopback, not on whatever address the hostname resolves to.
        "GLOO_SOCKET_IFNAME": "lo",
    }
    lines = _srun(
        slurm_cluster, str(python if python.exists() else sys.executable), "-c", _ALL_REDUCE, env=env
    )
    assert lines == ["n1 0 2 3", "n2 1 2 3"]
