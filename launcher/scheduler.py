"""What the scheduler says of a job, and how to stop one: SLURM (`squeue`, `scancel`) or a local
process (the local executor's job id is its controller's pid).

Read by `plan` (which runs have a live job), `status` (the scheduler column) and `submission`
(cancel a refused or superseded submission, `sweep cancel`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

from launcher.errors import UserError

LIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "RESIZING",
}


class SchedulerError(UserError):
    """SLURM did not answer or refused (sbatch, squeue, scancel); the message is its own."""


def slurm_message(stderr: str) -> str:
    """The last line SLURM wrote, without the tool's prefix."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def slurm_state(job_id: str) -> str:
    """squeue's state of a job ("" once it left the queue, or where there is no SLURM client).
    A controller that does not answer is an error: a job it cannot see may still run."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        return ""
    except subprocess.TimeoutExpired:
        raise SchedulerError(
            f"squeue -j {job_id} did not answer in 60 s: is the SLURM controller up?"
        ) from None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise SchedulerError(
            f"squeue failed (exit {out.returncode}) asking for job {job_id}: {slurm_message(out.stderr)}"
        )
    states = {s.strip() for s in out.stdout.split()}
    return next(iter(states)) if states else ""


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """squeue's state of many jobs in one call per 500 (a 1,000-run status asked once per run took
    seconds); jobs that left the queue are absent. A job id the controller has forgotten makes
    squeue refuse the whole list: then each job is asked alone."""
    wanted = sorted(set(job_ids))
    states: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        try:
            out = subprocess.run(
                ["squeue", "-h", "-r", "-j", ",".join(chunk), "-o", "%i %T"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        except FileNotFoundError:
            return {}
        except subprocess.TimeoutExpired:
            raise SchedulerError("squeue did not answer in 60 s: is the SLURM controller up?") from None
        if out.returncode != 0:
            if "Invalid job id" not in out.stderr:
                asked = (
                    f" {chunk[0]}"
                    if len(chunk) == 1
                    else f"s {', '.join(chunk[:3])}{', …' * (len(chunk) > 3)}"
                )
                raise SchedulerError(
                    f"squeue failed (exit {out.returncode}) asking for job{asked}: {slurm_message(out.stderr)}"
                )
            states.update({job: slurm_state(job) for job in chunk})
            continue
        for line in out.stdout.splitlines():
            job, _, state = line.strip().partition(" ")
            if job in chunk:
                states[job] = state
    return {job: state for job, state in states.items() if state}


def job_is_live(job: dict[str, Any] | None) -> bool:
    if not job:
        return False
    if job["executor"] == "slurm":
        return slurm_state(job["job_id"]) in LIVE_SLURM_STATES
    if job["executor"] == "local":
        try:
            os.kill(int(job["job_id"]), 0)  # the local job id is its controller's pid
            return True
        except (ProcessLookupError, ValueError, PermissionError):
            return False
    return False


def cancel_job(job: dict[str, Any], record: dict[str, Any]) -> None:
    """Stop one job: scancel on SLURM; locally SIGTERM to the job's own process (the record's pid)
    and its controller."""
    if job["executor"] == "slurm":
        out = subprocess.run(["scancel", job["job_id"]], capture_output=True, text=True, check=False)
        if (
            out.returncode != 0
            and "Invalid job id" not in out.stderr
            and "already completing" not in out.stderr
        ):
            raise SchedulerError(f"scancel {job['job_id']} failed: {slurm_message(out.stderr)}")
        return
    for pid in (record.get("pid"), int(job["job_id"])):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
