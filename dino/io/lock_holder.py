"""Who holds a run folder's lock: the description a holder writes into `<run.dir>/LOCK`, and the
words another process prints when it is refused. Both lock backends (dino/io/file_lock.py,
dino/io/lease_lock.py) write the same description, so a refusal reads the same on every storage."""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any


def holder_description() -> dict[str, Any]:
    """Who this process is, for the refusal message another process prints."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "slurm_job_id": job,
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", ""),
        "since": time.time(),
        "token": uuid.uuid4().hex,
    }


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid,
    an identity that a recycled pid does not share. "" where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def dead_on_this_host(holder: dict[str, Any]) -> bool:
    """Whether the holder is a process of this machine that no longer exists: then its lease is
    known dead without waiting for it to expire (an outage kept it from removing it, a SIGKILL)."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid_start"):
        return False
    return _process_start(int(holder.get("pid", 0))) != holder["pid_start"]


def same_slurm_job(holder: dict[str, Any]) -> bool:
    """Whether the holder is an earlier allocation of this very SLURM job (a requeue whose previous
    allocation is still ending, e.g. on a node that stopped answering): worth waiting for."""
    mine = holder_description()["slurm_job_id"]
    return bool(mine) and holder.get("slurm_job_id") == mine


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (no description)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    beat = f", renewed {time.time() - holder['heartbeat']:.0f} s ago" if holder.get("heartbeat") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, since {when}{beat}"
