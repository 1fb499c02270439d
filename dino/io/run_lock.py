"""One writer per run folder: the lock `dinolab train` holds on `<run.dir>/LOCK` while it trains.

Two processes training into one run folder (a requeued job whose old allocation still runs, a sweep
submitted twice, a user re-running by hand) corrupt it: checkpoints with one's state and the
other's marker, every step twice in metrics.jsonl. So rank 0 takes the run's lock before it writes
anything, and a second process is refused with a line naming the holder, or waits for it.

`RunLock` is the entry point: it picks the backend from the path and owns what both share (waiting,
the refusal line, the holder's description). How each frees a dead holder's lock, without guessing
from a timeout, is the backend's own: `flock` on a local or shared file system (`FileLock`, here), a
renewed lease on an object store (dino/io/lease_lock.py, which is handed `Holder` so that it needs
nothing of this module).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from dino.io import storage
from dino.io.lease_lock import LeaseLock, LockLost

# The names callers import from here (launcher/cli.py, dino/run/train.py, tests).
__all__ = [
    "LOCK_FILE",
    "LockLost",
    "RunLock",
    "RunLocked",
    "describe",
    "holder_description",
    "same_slurm_job",
]

LOCK_FILE = "LOCK"
log = logging.getLogger("dino.lock")


class RunLocked(RuntimeError):
    """Another process holds the run folder; the message names it."""


class _LockBackend(Protocol):
    def try_acquire(self) -> dict[str, Any] | None:
        """Take the lock once: None when this process now holds it, else the holder's description."""

    def check(self) -> None:
        """Raise LockLost if the lock was taken from this process."""

    def release(self) -> None: ...


@dataclass
class RunLock:
    run_dir: str
    heartbeat_s: float = 30.0
    """Object stores: how often the holder renews its lease."""
    stale_after_s: float = 600.0
    """Object stores: a lease not renewed for this long is taken over."""

    def __post_init__(self) -> None:
        self.path = storage.join(self.run_dir, LOCK_FILE)
        self.backend: _LockBackend = (
            LeaseLock(self.run_dir, self.path, self.heartbeat_s, self.stale_after_s, Holder)
            if storage.is_remote(self.run_dir)
            else FileLock(self.run_dir, self.path)
        )

    def acquire(
        self,
        wait: bool | Callable[[dict[str, Any]], bool] = False,
        poll_s: float = 5.0,
        on_wait: Callable[[str], None] | None = None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        """Take the lock, or raise RunLocked naming the holder. `wait` (or `wait(holder)` true):
        poll until it is free, unless `give_up()` turns true (a job told to stop while it waits);
        `on_wait(description)` is called once, when waiting starts."""
        announced = False
        while True:
            holder = self.backend.try_acquire()
            if holder is None:
                log.info("run folder %s locked by this process (%s)", self.run_dir, self.path)
                return
            text = describe(holder)
            if not (wait(holder) if callable(wait) else wait) or give_up():
                raise RunLocked(
                    f"{self.run_dir} is being trained by another process: {text}. Only one process may "
                    f"write a run folder; wait for it to end (train.wait_for_lock=true waits), or stop it"
                )
            if not announced and on_wait is not None:
                on_wait(text)
                announced = True
            time.sleep(poll_s)

    def check(self) -> None:
        """Raise LockLost if a remote lease was taken over (call before each write)."""
        self.backend.check()

    def release(self) -> None:
        self.backend.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- the holder: who holds a run folder's lock ---------------------------------------------------
# The description a holder writes into `<run.dir>/LOCK`, and the words another process prints when it
# is refused. Both backends write the same description, so a refusal reads the same on every storage.


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


class Holder:
    """The holder functions as one object, for the lease backend (dino/io/lease_lock.py)."""

    mine = staticmethod(holder_description)
    dead_on_this_host = staticmethod(dead_on_this_host)
    describe = staticmethod(describe)


# ---- the file backend: flock on a local or shared file system ------------------------------------
# `flock` on `<run.dir>/LOCK`, held by an open file for the process's life. The kernel releases it
# when the process ends, however it ends (SIGKILL included); on NFS the server releases it when the
# client's lease runs out (a node failure). So a dead holder's lock is free at once, without guessing
# from a timeout. The file keeps the holder's description (host, pid, SLURM job, since) for the
# refusal message; it is never deleted (a lock, not a marker).


class FileLock:
    """One backend of `dino.io.run_lock.RunLock`: try once, check, release."""

    def __init__(self, run_dir: str, path: str) -> None:
        self.run_dir, self.path = run_dir, path
        self._file: IO[str] | None = None

    def try_acquire(self) -> dict[str, Any] | None:
        """None when this process now holds the lock, else the holder's description."""
        os.makedirs(self.run_dir, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's life
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return self._read_holder(file)
            finally:
                file.close()
        # Ours: describe ourselves for the next process that is refused.
        try:
            file.seek(0)
            file.truncate()
            file.write(json.dumps(holder_description()))
            file.flush()
            os.fsync(file.fileno())
        except OSError as err:  # a full disk: refuse to start rather than train without the lock
            with contextlib.suppress(OSError):  # the buffered write fails again; the file closes anyway
                file.close()  # releases the flock
            raise storage.WriteError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._file = file
        return None

    def check(self) -> None:
        """Nothing to check: no one can take a flock from a living process."""

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @staticmethod
    def _read_holder(file: IO[str], settle_s: float = 2.0) -> dict[str, Any]:
        """The holder's description. A holder writes it just after it takes the flock (truncate, then
        write), so a contender started at the same instant can read an empty or half-written file:
        read again for up to `settle_s` before naming no one."""
        deadline = time.monotonic() + settle_s
        while True:
            file.seek(0)
            text = file.read()
            with contextlib.suppress(json.JSONDecodeError):
                if text.strip():
                    return json.loads(text)
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.05)
