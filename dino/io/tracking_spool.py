"""The run folder's side of tracking: updates not sent before exit, and steps never sent at all.

`<run>/tracking_pending.jsonl` holds what `MLflowTracker.close` could not send in time (the store
was down); the next tracker on the same run (a requeued job, an evaluation) sends it first.
`metrics.jsonl` (written synchronously every log step) holds what a killed process logged but never
sent: `backfill` reads back the steps the store does not have.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dino.io import storage

PENDING = "tracking_pending.jsonl"


def spool(run_dir: str, items: list[tuple[str, Any]]) -> str:
    """Add queued updates to the run's pending file; returns its path."""
    path = storage.join(run_dir, PENDING)
    lines = "".join(json.dumps({"kind": kind, "value": value}) + "\n" for kind, value in items)
    old = storage.read_text(path) if storage.exists(path) else ""
    storage.atomic_write_text(path, old + lines)  # whole-file write: object stores cannot append
    return path


def take_spooled(run_dir: str, training: bool) -> list[tuple[str, Any]]:
    """The run's pending updates, removing the file (they are in the caller's queue now; a failure
    spools them again at close). A training job drops spooled statuses: it sets its own."""
    path = storage.join(run_dir, PENDING)
    if not storage.exists(path):
        return []
    items = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    storage.remove(path)
    return [(i["kind"], i["value"]) for i in items if i["kind"] != "status" or not training]


def backfill(run_dir: str, watermark: int) -> list[tuple[str, Any]]:
    """Training steps in metrics.jsonl after `watermark` (the last step the store has), as queued
    metrics updates."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    rows: dict[int, dict[str, float]] = {}
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if row.get("step", -1) > watermark:
            rows[int(row["step"])] = row
    now = int(time.time() * 1000)
    return [
        ("metrics", [(k, float(v), now, step) for k, v in row.items() if k != "step"])
        for step, row in sorted(rows.items())
    ]
