"""Checkpoints published in the background: the train loop waits only for serialisation to host memory.

`save()` snapshots the state into bytes in the caller's thread (after that, training may change the
tensors), then one background thread writes the state file, the marker and the run's log files, and
prunes. At most one save is in flight: the next `save()` and `close()` wait for it. A failed upload is
reported at once (ERROR, with the newest checkpoint that is still complete) and training goes on, so a
storage outage costs checkpoints, not the run; the next save tries again. Only a failure of the last
save, the one a resumed run would need, makes `close()` raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dino.io import checkpoint, storage

log = logging.getLogger("dino.checkpoint")


class CheckpointWriteError(RuntimeError):
    """The newest checkpoint could not be written; the message says which one is complete instead."""


class CheckpointWriter:
    def __init__(
        self,
        run_dir: str,
        config_hash: str,
        keep_last: int,
        on_complete: Callable[[int, str], None] = lambda step, path: None,
    ) -> None:
        self.run_dir, self.config_hash, self.keep_last = run_dir, config_hash, keep_last
        self.on_complete = on_complete
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self.last_complete: int | None = None

    def save(self, step: int, state: dict[str, Any], logs: Sequence[storage.AppendLog] = ()) -> None:
        """Checkpoint `state` as step `step`; the remote `logs` are published after it, as they are now
        (snapshots taken here, so the upload never reads a growing file), and marked published."""
        start = time.monotonic()
        data = checkpoint.serialize(state)
        snapshots = [(run_log, run_log.snapshot()) for run_log in logs]
        serialize_s = time.monotonic() - start
        self.wait()
        self._thread = threading.Thread(
            target=self._publish, args=(step, data, snapshots, serialize_s), name=f"checkpoint-{step}"
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is published or has failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Wait for the last save; raise `CheckpointWriteError` if that one failed."""
        self.wait()
        if self._failure is not None:
            step, err = self._failure
            raise CheckpointWriteError(
                f"the checkpoint of step {step} could not be written to {self.run_dir}: {err}. "
                f"{self._fallback()} Run the same command again once the storage is reachable."
            )

    def _fallback(self) -> str:
        if self.last_complete is not None:
            return f"The newest complete checkpoint is still step {self.last_complete}."
        return "Earlier complete checkpoints are kept; a resumed run starts from the newest."

    def _publish(
        self, step: int, data: bytes, snapshots: list[tuple[storage.AppendLog, bytes]], serialize_s: float
    ) -> None:
        start = time.monotonic()
        try:
            published = checkpoint.publish(self.run_dir, step, data, self.config_hash, self.keep_last)
            for run_log, content in snapshots:
                storage.atomic_write_bytes(run_log.path, content)
                run_log.published(len(content))  # closing the log uploads only what comes after
        except Exception as err:  # noqa: BLE001 - reported here, raised by close() if it was the last
            self._failure = (step, err)
            log.error(
                "checkpoint of step %d NOT written to %s: %s. %s Training goes on; the next checkpoint "
                "tries again.", step, self.run_dir, err, self._fallback(),
            )  # fmt: skip
            return
        self._failure = None
        self.last_complete = step
        if published.written:  # otherwise publish() said that it kept the valid checkpoint there
            log.info(
                "checkpoint %s (%.1f MB; %.2f s serialising in the loop, %.2f s writing in the background)",
                published.path, len(data) / 1e6, serialize_s, time.monotonic() - start,
            )  # fmt: skip
        self.on_complete(step, published.path)
