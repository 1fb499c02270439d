"""One writer per run folder: the lock `dinolab train` holds on `<run.dir>/LOCK` while it trains.

Two processes training into one run folder (a requeued job whose old allocation still runs, a sweep
submitted twice, a user re-running by hand) corrupt it: checkpoints with one's state and the
other's marker, every step twice in metrics.jsonl. So rank 0 takes the run's lock before it writes
anything, and a second process is refused with a line naming the holder, or waits for it.

`RunLock` is the entry point: it picks the backend from the path and owns what both share (waiting,
the refusal line). How each frees a dead holder's lock, without guessing from a timeout, is the
backend's own: `flock` on a local or shared file system (dino/io/file_lock.py), a renewed lease on
an object store (dino/io/lease_lock.py). The holder's description is dino/io/lock_holder.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dino.io import storage
from dino.io.file_lock import FileLock
from dino.io.lease_lock import LeaseLock, LockLost
from dino.io.lock_holder import describe, holder_description, same_slurm_job

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


class LockBackend(Protocol):
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
        self.backend: LockBackend = (
            LeaseLock(self.run_dir, self.path, self.heartbeat_s, self.stale_after_s)
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
