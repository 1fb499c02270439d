"""Experiment tracking behind a small interface: the `Tracker` protocol, `NullTracker`, and the link
between a run folder and its MLflow run.

dino/io/mlflow_tracker.py holds the MLflow tracker and the factories (`build_tracker`: rank 0 gets an
`MLflowTracker` when `tracking.uri` is set, every other process a `NullTracker`). A run folder is tied to its MLflow run by
`<run>/tracking.json` ({uri, experiment_id, run_id}); whoever creates the MLflow run writes it (the
sweep launcher before it submits, or the first `dinolab train`), and every later start, requeue and
evaluation reads it, so a preempted run stays one MLflow run with one metric history.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from dino.io import storage

LINK = "tracking.json"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str = "") -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str = "") -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def read_link(run_dir: str) -> dict[str, str] | None:
    """The MLflow run tied to `run_dir` ({uri, experiment_id, run_id}), or None."""
    path = storage.join(run_dir, LINK)
    if not storage.exists(path):
        return None
    try:
        link = json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        return None
    return link if isinstance(link, dict) and link.get("run_id") and link.get("uri") else None


def write_link(run_dir: str, uri: str, experiment_id: str, run_id: str) -> None:
    storage.makedirs(run_dir)
    link = {"uri": uri, "experiment_id": experiment_id, "run_id": run_id}
    storage.atomic_write_text(storage.join(run_dir, LINK), json.dumps(link, indent=1))
