"""Array parallelism for submitit's local executor, which starts every job at once.

Each local job takes one of N slot files with a non-blocking `flock` before it works, and waits
while all are taken. The kernel drops the lock when the process ends, however it ends, so a killed
job never leaves a slot taken.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO


def acquire(folder: str, slots: int, poll_s: float = 0.5) -> IO:
    """Block until one of `slots` slots under `folder` is free; keep the returned file open to hold it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            handle = open(os.path.join(folder, f"slot-{i}.lock"), "w")  # noqa: SIM115 - held open on purpose
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
        time.sleep(poll_s)
