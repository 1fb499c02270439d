"""The run lock on a local or shared file system: `flock` on `<run.dir>/LOCK`, held by an open file
for the process's life.

The kernel releases it when the process ends, however it ends (SIGKILL included); on NFS the server
releases it when the client's lease runs out (a node failure). So a dead holder's lock is free at
once, without guessing from a timeout. The file keeps the holder's description (host, pid, SLURM
job, since) for the refusal message; it is never deleted (a lock, not a marker).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import IO, Any

from dino.io import storage
from dino.io.lock_holder import holder_description


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
