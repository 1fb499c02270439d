"""Step-based checkpoints: written files first, marker last; last k kept; loaded strictly.

Layout: <run.dir>/checkpoints/<step, 9 digits>/{state.pt, COMPLETE.json}. A checkpoint exists for
resuming only once its marker does; the marker holds the state file's size and SHA-256, so a
truncated or corrupt file is detected, reported and skipped for the previous complete checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from dino import code_version, storage

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE.json"
log = logging.getLogger("dino.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be used (other config, wrong keys); the message says why."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: str
    state: dict[str, Any]
    marker: dict[str, Any]


def checkpoints_root(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return storage.join(checkpoints_root(run_dir), f"{step:09d}")


def is_complete(path: str) -> bool:
    return storage.exists(storage.join(path, MARKER_FILE))


def list_steps(run_dir: str) -> list[int]:
    """Steps of every checkpoint folder, complete or not, ascending."""
    return sorted(int(name) for name in storage.listdir(checkpoints_root(run_dir)) if name.isdigit())


def complete_steps(run_dir: str) -> list[int]:
    return [s for s in list_steps(run_dir) if is_complete(checkpoint_path(run_dir, s))]


def serialize(state: dict[str, Any]) -> bytes:
    """The checkpoint's bytes in host memory (a snapshot: training may go on changing the tensors)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def publish(run_dir: str, step: int, data: bytes, config_hash: str, keep_last: int) -> str:
    """Write serialized state as the checkpoint of `step`: state file, then marker, then prune.

    A complete checkpoint of that step is never overwritten; a partial leftover of an interrupted
    save is replaced. Older checkpoints are pruned only after this one is complete.
    """
    path = checkpoint_path(run_dir, step)
    if is_complete(path):
        return path
    storage.remove(path)
    storage.atomic_write_bytes(storage.join(path, STATE_FILE), data)
    marker = {
        "step": step,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "config_hash": config_hash,
        "code_version": code_version(),
        "time": time.time(),
    }
    storage.atomic_write_text(storage.join(path, MARKER_FILE), json.dumps(marker, indent=1))
    prune(run_dir, keep_last)
    return path


def save(run_dir: str, step: int, state: dict[str, Any], config_hash: str, keep_last: int) -> str:
    """Serialize and publish in the calling thread (see `CheckpointWriter` for the background one)."""
    return publish(run_dir, step, serialize(state), config_hash, keep_last)


def prune(run_dir: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and older partial leftovers."""
    complete = complete_steps(run_dir)
    if not complete:
        return
    keep = set(complete[-keep_last:])
    for step in list_steps(run_dir):
        if step < complete[-1] and step not in keep:
            storage.remove(checkpoint_path(run_dir, step))


def _read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, marker) of one checkpoint folder; raises ValueError describing what is wrong."""
    if not is_complete(path):
        raise ValueError("partial (no COMPLETE.json marker: the save was interrupted)")
    marker = json.loads(storage.read_text(storage.join(path, MARKER_FILE)))
    state_path = storage.join(path, STATE_FILE)
    if not storage.exists(state_path):
        raise ValueError(f"corrupt ({STATE_FILE} is missing)")
    data = storage.read_bytes(state_path)
    if len(data) != marker["size"] or hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise ValueError(
            f"corrupt ({STATE_FILE} has {len(data)} bytes and another checksum than its marker says)"
        )
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
