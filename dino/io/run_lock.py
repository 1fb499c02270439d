"""One writer per run folder: the lock `dinolab train` holds on `<run.dir>/LOCK` while it trains.

Two processes training into one run folder (a requeued job whose old allocation still runs, a sweep
submitted twice, a user re-running by hand) corrupt it: checkpoints with one's state and the
other's marker, every step twice in metrics.jsonl. So rank 0 takes the run's lock before it writes
anything, and a second process is refused with a line naming the holder, or waits for it.

How a dead holder's lock is freed, without guessing from a timeout:
- A local or shared file system: `flock` on `<run.dir>/LOCK`, held by an open file for the process's
  life. The kernel releases it when the process ends, however it ends (SIGKILL included); on NFS the
  server releases it when the client's lease runs out (a node failure). The file keeps the holder's
  description (host, pid, SLURM job, since) for the refusal message; it is never deleted.
- An object store (s3://) has no locks: the holder keeps a lease object `<run.dir>/LOCK` alive,
  rewriting it every `heartbeat_s` with a conditional PUT (If-Match its own version). Another process
  takes over only a lease not renewed for `stale_after_s` (default 10 minutes, many heartbeats), or
  one whose holder was a process of this very machine that no longer exists (pid and start time),
  and only with a conditional PUT on the exact version it judged stale (dino/io/lease_object.py): of
  two contenders one wins. A holder whose renewal fails because another took over has lost the
  lock: `check()` raises and the train loop stops before it writes again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dino.io import storage
from dino.io.lease_object import put_lease, read_lease

LOCK_FILE = "LOCK"
log = logging.getLogger("dino.lock")


class RunLocked(RuntimeError):
    """Another process holds the run folder; the message names it."""


class LockLost(RuntimeError):
    """This process's lease on a remote run folder was taken over: it must not write again."""


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


@dataclass
class RunLock:
    run_dir: str
    heartbeat_s: float = 30.0
    stale_after_s: float = 600.0

    def __post_init__(self) -> None:
        self.path = storage.join(self.run_dir, LOCK_FILE)
        self.remote = storage.is_remote(self.run_dir)
        self._file = None
        self._etag = ""
        self._holder: dict[str, Any] = {}
        self._lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------
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
            holder = self._try_acquire()
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
        if self._lost:
            raise LockLost(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self.remote and self._etag and not self._lost:
            try:
                if read_lease(self.path)[1] == self._etag:  # still ours (a taken-over lease is not)
                    storage.remove(self.path)
            except Exception as err:  # noqa: BLE001 - an outage: the lease then expires by itself
                log.warning("could not remove the lock %s (it expires unrenewed): %s", self.path, err)
            self._etag = ""

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---------------------------------------------------------------------------------------------
    def _try_acquire(self) -> dict[str, Any] | None:
        """None when this process now holds the lock, else the holder's description."""
        return self._try_remote() if self.remote else self._try_local()

    def _try_local(self) -> dict[str, Any] | None:
        os.makedirs(self.run_dir, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's life
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return self._read_local_holder(file)
            finally:
                file.close()
        # Ours: describe ourselves for the next process that is refused.
        self._holder = holder_description()
        try:
            file.seek(0)
            file.truncate()
            file.write(json.dumps(self._holder))
            file.flush()
            os.fsync(file.fileno())
        except OSError as err:  # a full disk: refuse to start rather than train without the lock
            with contextlib.suppress(OSError):  # the buffered write fails again; the file closes anyway
                file.close()  # releases the flock
            raise storage.WriteError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._file = file
        return None

    @staticmethod
    def _read_local_holder(file: Any, settle_s: float = 2.0) -> dict[str, Any]:
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

    def _try_remote(self) -> dict[str, Any] | None:
        storage.makedirs(self.run_dir)
        holder = holder_description() | {"heartbeat": time.time()}
        etag = put_lease(self.path, holder, mode="create")
        if etag is None:
            current, current_etag = read_lease(self.path)
            if not current_etag:
                return self._try_remote()  # released between the two calls: try again
            age = time.time() - float(current.get("heartbeat", 0) or 0)
            if age < self.stale_after_s and not dead_on_this_host(current):
                return current
            # Not renewed for stale_after_s (many heartbeats): the holder is gone. Take over exactly
            # that version; a contender that took it first makes this PUT fail.
            etag = put_lease(self.path, holder, IfMatch=current_etag)
            if etag is None:
                return read_lease(self.path)[0]
            why = f"not renewed for {age:.0f} s" if age >= self.stale_after_s else "that process has ended"
            log.warning("took over the lock of %s from %s: %s", self.run_dir, describe(current), why)
        self._holder, self._etag = holder, etag
        self._thread = threading.Thread(target=self._renew, name="dino-lock", daemon=True)
        self._thread.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._holder["heartbeat"] = time.time()
            try:
                etag = put_lease(self.path, self._holder, IfMatch=self._etag)
            except Exception as err:  # noqa: BLE001 - an outage: try again next beat
                log.warning("could not renew the lock %s: %s", self.path, err)
                continue
            if etag is None:
                current, _ = read_lease(self.path)
                self._lost = (
                    f"the lock of {self.run_dir} was taken over by {describe(current)} (this process's lease "
                    f"was not renewed in time); stopping without writing"
                )
                log.error("%s", self._lost)
                return
            self._etag = etag
