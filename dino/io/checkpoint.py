"""Step-based checkpoints: written files first, marker last; last k kept; loaded strictly.

Layout: <run.dir>/checkpoints/<step, 9 digits>/{state.pt, COMPLETE.json}. A checkpoint exists for
resuming only once its marker does; the marker holds the step and the state file's size and SHA-256
(besides the config hash, the code hash of the process that wrote it and the run's `on_code_change`
policy, which dino/run/state.py checks on resume), so a truncated or corrupt file, or an unreadable
or incomplete marker, is detected, reported (one warning line) and skipped for the previous
complete checkpoint. When a resumed run reaches the step of such a damaged checkpoint again, the
damaged folder is moved aside to `checkpoints/<step>.corrupt-<UTC time>/` (nothing is deleted) and
the checkpoint is written anew; a valid checkpoint is never overwritten.

Published in the background (`CheckpointWriter`): the train loop waits only for serialisation to
host memory. `save()` snapshots the state into bytes in the caller's thread (after that, training may
change the tensors), then one background thread writes the state file, the marker and the run's log
files, and prunes. At most one save is in flight: the next `save()` and `close()` wait for it. A
failed upload is reported at once (ERROR, with the newest checkpoint that is still complete) and
training goes on, so a storage outage costs checkpoints, not the run; the next save tries again.
Only a failure of the last save, the one a resumed run would need, makes `close()` raise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dino import code_version
from dino.config.identity import code_hash
from dino.io import storage

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE.json"
CORRUPT_SUFFIX = ".corrupt-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("dino.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be used (other config, wrong keys); the message says why."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: str
    state: dict[str, Any]
    marker: dict[str, Any]


@dataclass(frozen=True)
class Published:
    """What `publish` did: `written` is False when a valid checkpoint of that step was kept as is."""

    path: str
    written: bool


def checkpoints_root(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return storage.join(checkpoints_root(run_dir), f"{step:09d}")


def has_marker(path: str) -> bool:
    return storage.exists(storage.join(path, MARKER_FILE))


def is_complete(path: str) -> bool:
    """The folder has a marker with its fields (the state file itself is checked only on loading)."""
    try:
        _marker(path)
    except ValueError:
        return False
    return True


def _folder_step(path: str) -> int | None:
    name = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    return int(name) if name.isascii() and name.isdigit() else None


def _marker(path: str) -> dict[str, Any]:
    """The marker of one checkpoint folder; raises ValueError saying why it is missing or unusable."""
    if not has_marker(path):
        raise ValueError(f"partial (no {MARKER_FILE} marker: the save was interrupted)")
    try:
        marker = json.loads(storage.read_bytes(storage.join(path, MARKER_FILE)).decode())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"corrupt ({MARKER_FILE} is not JSON: {err})") from None
    if not isinstance(marker, dict):
        raise ValueError(f"corrupt ({MARKER_FILE} holds {type(marker).__name__}, not an object)")
    missing = [key for key in ("step", "size", "sha256") if key not in marker]
    if missing:
        raise ValueError(f"corrupt ({MARKER_FILE} lacks {', '.join(map(repr, missing))})")
    for key in ("step", "size"):
        value = marker[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"corrupt ({MARKER_FILE} has {key}={value!r}, not a whole number)")
    if not isinstance(marker["sha256"], str) or not _SHA256.fullmatch(marker["sha256"]):
        raise ValueError(f"corrupt ({MARKER_FILE} has sha256={marker['sha256']!r}, not a SHA-256 hex digest)")
    folder_step = _folder_step(path)
    if folder_step is not None and marker["step"] != folder_step:
        raise ValueError(
            f"corrupt ({MARKER_FILE} says step {marker['step']}, the folder is step {folder_step})"
        )
    return marker


def list_steps(run_dir: str) -> list[int]:
    """Steps of every checkpoint folder, complete or not, ascending."""
    return sorted(int(name) for name in storage.listdir(checkpoints_root(run_dir)) if name.isdigit())


def complete_steps(run_dir: str) -> list[int]:
    return [s for s in list_steps(run_dir) if is_complete(checkpoint_path(run_dir, s))]


def serialize(state: dict[str, Any]) -> bytes:
    """The checkpoint's bytes in host memory (a snapshot: training may go on changing the tensors)."""
    import torch  # here, not at the top: sweep plan/status read markers and must not pay torch's import

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def publish(
    run_dir: str, step: int, data: bytes, config_hash: str, keep_last: int, code: dict[str, str] | None = None
) -> Published:
    """Write serialized state as the checkpoint of `step`: state file, then marker, then prune.
    `code` ({"code_hash", "on_code_change"}, what `TrainState.state_dict` holds under "code") goes
    into the marker; without it the marker gets this process's code hash.

    A valid checkpoint of that step is never overwritten (it is kept, and `written` is False); a
    damaged one (bad marker, state file that does not match it) is moved aside to
    `<step>.corrupt-<UTC time>` and written anew; a partial leftover of an interrupted save is
    replaced. Older checkpoints are pruned only after this one is complete.
    """
    path = checkpoint_path(run_dir, step)
    if has_marker(path):
        try:
            _verified(path)
        except ValueError as why:
            aside = _move_aside(path)
            log.warning("checkpoint %s is %s; moved aside to %s and written again", path, why, aside)
        else:
            log.info("checkpoint %s is already complete and valid: kept, nothing written", path)
            return Published(path, written=False)
    storage.remove(path)
    marker = {
        "step": step,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "config_hash": config_hash,
        "code_version": code_version(),
        "code_hash": code_hash(),
        **(code or {}),
        "time": time.time(),
    }
    try:
        storage.atomic_write_bytes(storage.join(path, STATE_FILE), data)
        storage.atomic_write_text(storage.join(path, MARKER_FILE), json.dumps(marker, indent=1))
    except storage.WriteError:
        with contextlib.suppress(Exception):  # a full disk: give back what the partial copy holds
            storage.remove(path)
        raise
    prune(run_dir, keep_last, upto=step)
    return Published(path, written=True)


def save(run_dir: str, step: int, state: dict[str, Any], config_hash: str, keep_last: int) -> str:
    """Serialize and publish in the calling thread (see `CheckpointWriter` for the background one)."""
    return publish(run_dir, step, serialize(state), config_hash, keep_last, state.get("code")).path


def _move_aside(path: str) -> str:
    """Move a damaged checkpoint folder to `<step>.corrupt-<UTC time>` beside it (ignored by
    `list_steps`, never pruned); copy then remove, so it works on object stores too."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = f"{path.rstrip('/')}{CORRUPT_SUFFIX}{stamp}", 1
    while storage.exists(aside):
        n += 1
        aside = f"{path.rstrip('/')}{CORRUPT_SUFFIX}{stamp}-{n}"
    for name in storage.find(path):
        storage.atomic_write_bytes(storage.join(aside, name), storage.read_bytes(storage.join(path, name)))
    storage.remove(path)
    return aside


def prune(run_dir: str, keep_last: int, upto: int | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints up to step `upto` (the one just written);
    drop older ones and older partial leftovers (no marker). Folders above `upto` (damaged ones a
    resumed run skipped) and older folders with a damaged marker are left alone."""
    steps = [s for s in list_steps(run_dir) if upto is None or s <= upto]
    complete = [s for s in steps if is_complete(checkpoint_path(run_dir, s))]
    if not complete:
        return
    keep = set(complete[-keep_last:])
    for step in steps:
        path = checkpoint_path(run_dir, step)
        if step < complete[-1] and step not in keep and (step in complete or not has_marker(path)):
            storage.remove(path)


def _verified(path: str) -> tuple[bytes, dict[str, Any]]:
    """(state file bytes, marker) of one checkpoint folder whose state file matches its marker;
    raises ValueError describing what is wrong."""
    marker = _marker(path)
    state_path = storage.join(path, STATE_FILE)
    if not storage.exists(state_path):
        raise ValueError(f"corrupt ({STATE_FILE} is missing)")
    data = storage.read_bytes(state_path)
    if len(data) != marker["size"] or hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise ValueError(
            f"corrupt ({STATE_FILE} has {len(data)} bytes and another checksum than its marker says)"
        )
    return data, marker


def _read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, marker) of one checkpoint folder; raises ValueError describing what is wrong."""
    import torch

    data, marker = _verified(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(f"corrupt (cannot be read: {err})") from None
    return state, marker


def load_latest(run_dir: str) -> LoadedCheckpoint | None:
    """The newest complete, readable checkpoint of the run; skipped ones are reported as warnings."""
    for step in reversed(list_steps(run_dir)):
        path = checkpoint_path(run_dir, step)
        try:
            state, marker = _read(path)
        except ValueError as why:
            log.warning("checkpoint %s is %s; skipped for the previous complete one", path, why)
            continue
        return LoadedCheckpoint(step, path, state, marker)
    return None


def load(path: str) -> LoadedCheckpoint:
    """One specific checkpoint folder; refuses an incomplete or corrupt one."""
    try:
        state, marker = _read(path)
    except ValueError as why:
        raise CheckpointError(f"checkpoint {path} is {why}") from None
    return LoadedCheckpoint(int(marker["step"]), path, state, marker)


# ---- the background writer -------------------------------------------------------------------------
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
        (snapshots taken here, so the upload never reads a growing file), and marked published. The
        state's "code" entry (code hash and policy, `TrainState.state_dict`) is copied into the marker."""
        start = time.monotonic()
        data = serialize(state)
        snapshots = [(run_log, run_log.snapshot()) for run_log in logs]
        serialize_s = time.monotonic() - start
        self.wait()
        self._thread = threading.Thread(
            target=self._publish,
            args=(step, data, snapshots, serialize_s, state.get("code")),
            name=f"checkpoint-{step}",
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
        self, step: int, data: bytes, snapshots: list[tuple[storage.AppendLog, bytes]], serialize_s: float,
        code: dict[str, str] | None,
    ) -> None:  # fmt: skip
        start = time.monotonic()
        try:
            published = publish(self.run_dir, step, data, self.config_hash, self.keep_last, code)
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
