"""The MLflow side of a tracked run: which run to log to, where its history stands, where this
process runs (provenance tags), and how queued updates become `log_batch` calls within MLflow's
limits. `MLflowTracker` (dino/io/mlflow_tracker.py) calls these from its sender thread.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino.io import mlflow_store
from dino.io.tracking import read_link, write_link

log = logging.getLogger("dino.tracking")

PROGRESS_KEY = "loss"  # every training log step logs it; its last step is the store's watermark
MAX_METRICS, MAX_PARAMS_TAGS = 1000, 100  # MLflow's log_batch limits


def git_commit() -> str:
    """The commit of the dinolab source tree this process runs ("" when it is not a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance_tags() -> dict[str, str]:
    """Where this process runs: host, SLURM job, git commit."""
    tags = {"dinolab.host": socket.gethostname(), "dinolab.git_commit": git_commit()}
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job:
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    job = job or os.environ.get("SLURM_JOB_ID", "")
    if job:
        tags["dinolab.slurm_job_id"] = job
    return {k: v for k, v in tags.items() if v}


@dataclass
class OpenedRun:
    """A run ready to log to: its id, the params it already has and the last training step it has."""

    run_id: str
    known_params: dict[str, str]
    watermark: int


def open_run(
    client: Any, uri: str, run_dir: str, experiment: str, run_name: str, training: bool
) -> OpenedRun:
    """The run tied to `run_dir` by tracking.json (else a new one, linked); a training start also
    counts itself (`dinolab.starts`, `dinolab.requeues`), tags where it runs and marks it RUNNING."""
    link = read_link(run_dir)
    run = None
    if link and link["uri"] == uri:
        try:
            run = client.get_run(link["run_id"])
        except Exception as err:
            if not mlflow_store.is_permanent(err):
                raise
            log.warning("MLflow run %s of %s is gone (%s); starting a new one", link["run_id"],
                        run_dir, str(err).splitlines()[0][:200])  # fmt: skip
    if run is None:
        experiment_id = mlflow_store.ensure_experiment(client, uri, experiment)
        run_id = mlflow_store.create_run(client, uri, experiment_id, run_name, {"dinolab.kind": "run"})
        write_link(run_dir, uri, experiment_id, run_id)
        run = client.get_run(run_id)
    run_id = run.info.run_id
    history = client.get_metric_history(run_id, PROGRESS_KEY)
    opened = OpenedRun(run_id, dict(run.data.params), max((m.step for m in history), default=-1))
    with mlflow_store.locked(uri):
        if training:
            starts = int(run.data.tags.get("dinolab.starts", "0")) + 1
            tags = {
                **provenance_tags(),
                "dinolab.starts": str(starts),
                "dinolab.requeues": str(starts - 1),
            }
            job = tags.get("dinolab.slurm_job_id")
            if job:
                jobs = [j for j in run.data.tags.get("dinolab.slurm_job_ids", "").split(",") if j]
                tags["dinolab.slurm_job_ids"] = ",".join(dict.fromkeys([*jobs, job]))
            client.log_batch(run_id, tags=run_tags(tags))
            client.update_run(run_id, status="RUNNING")
    return opened


@dataclass
class Batch:
    """Consecutive queued metrics/params/tags updates merged into one `log_batch`."""

    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    taken: int = 0  # queued items it holds
    mark: int = -1  # the watermark once it is sent


def take_batch(
    items: list[tuple[str, Any]], training: bool, watermark: int, known_params: dict[str, str]
) -> Batch:
    """The longest run of metrics/params/tags items at the head of `items` that fits MLflow's limits;
    training steps the store already has (at or below the watermark) and params it has are left out."""
    # `mark` moves through the batch too: a backfilled step and the same step logged again by
    # the resumed loop can meet in one batch.
    batch = Batch(mark=watermark)
    for kind, value in items:
        if kind == "metrics":
            fresh = [m for m in value if not training or m[3] > batch.mark]
            if batch.metrics and len(batch.metrics) + len(fresh) > MAX_METRICS:
                break
            batch.metrics += fresh
            if training:
                batch.mark = max([batch.mark, *(m[3] for m in fresh)])
        elif kind == "params":
            new = {k: v for k, v in value.items() if k not in known_params}
            full = len(batch.params) + len(new) + len(batch.tags) > MAX_PARAMS_TAGS
            if full and (batch.params or batch.tags or batch.metrics):
                break
            batch.params.update(new)
        elif kind == "tags":
            full = len(batch.params) + len(batch.tags) + len(value) > MAX_PARAMS_TAGS
            if full and (batch.params or batch.tags or batch.metrics):
                break
            batch.tags.update(value)
        else:
            break
        batch.taken += 1
    return batch


def run_tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]
