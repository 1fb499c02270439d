"""The sweep's MLflow layout, created by the launcher before any job starts.

One experiment per sweep (named after it), one parent run for the sweep and one child run per run
id, created here, in one process, so parallel jobs never race to create the schema, the experiment
or their run. Each run folder gets its `tracking.json` link; the jobs (and every requeue and
evaluation of them) log into that run. A child starts SCHEDULED; the job sets RUNNING, then
FINISHED, KILLED (preempted, to be requeued) or FAILED.
"""

from __future__ import annotations

from typing import Any

from dino.io import mlflow_store, storage
from dino.io.tracking import LINK, read_link, write_link
from launcher.grid import RunSpec
from launcher.sweep_file import Sweep


class TrackingUnavailable(RuntimeError):
    """The sweep's tracking store cannot be reached or written at submit time."""


def run_tags(sweep: Sweep, run: RunSpec, parent_id: str) -> dict[str, str]:
    tags = {
        "mlflow.parentRunId": parent_id,
        "dinolab.kind": "run",
        "dinolab.sweep": sweep.name,
        "dinolab.run_id": run.run_id,
        "dinolab.run_dir": run.run_dir,
        "dinolab.config_hash": run.run_id,
        "dinolab.seed": str(run.seed),
    }
    tags.update({f"axis.{k}": str(v) for k, v in run.axes.items()})
    return tags


def prepare(
    sweep: Sweep, runs: list[RunSpec], created: list[str] | None = None,
    tags: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Experiment, parent run and a child run for each of `runs` that has none yet; returns
    {run_id: MLflow run id} and appends the folders whose MLflow run it created to `created` (for
    `rollback`). `tags` (by run id: the submission's cost estimate) are set on new and existing
    child runs alike. Nothing to do when the sweep has no tracking store."""
    uri = sweep.tracking_uri
    if not uri:
        return {}
    try:
        return _prepare(sweep, runs, uri, created if created is not None else [], tags or {})
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TrackingUnavailable(
            f"tracking store {uri} of sweep {sweep.path}: {first}. Start the server (or fix "
            "tracking_uri), or submit with tracking_uri=none to run without tracking"
        ) from None


def _prepare(
    sweep: Sweep, runs: list[RunSpec], uri: str, created: list[str], run_extra: dict[str, dict[str, str]]
) -> dict[str, str]:
    client = mlflow_store.client(uri)
    artifacts = storage.join(sweep.root, "mlartifacts", sweep.name) if storage.is_remote(sweep.root) else None
    experiment_id = mlflow_store.ensure_experiment(client, uri, sweep.name, artifacts)
    parent = _linked_run(client, sweep.folder, uri)
    if parent is None:
        tags = {"dinolab.kind": "sweep", "dinolab.sweep": sweep.name, "dinolab.sweep_file": sweep.path,
                "dinolab.axes": ",".join([*sweep.grid, *sweep.zip])}  # fmt: skip
        parent = mlflow_store.create_run(client, uri, experiment_id, sweep.name, tags)
        write_link(sweep.folder, uri, experiment_id, parent)
        created.append(sweep.folder)
    ids = {}
    for run in runs:
        child = _linked_run(client, run.run_dir, uri)
        extra = run_extra.get(run.run_id, {})
        if child is None:
            tags = {**run_tags(sweep, run, parent), **extra}
            child = mlflow_store.create_run(client, uri, experiment_id, run.name, tags, status="SCHEDULED")
            write_link(run.run_dir, uri, experiment_id, child)
            created.append(run.run_dir)
        elif extra:
            from mlflow.entities import RunTag

            with mlflow_store.locked(uri):
                client.log_batch(child, tags=[RunTag(k, v) for k, v in extra.items()])
        ids[run.run_id] = child
    return ids


def rollback(sweep: Sweep, created: list[str]) -> None:
    """Delete the MLflow runs `prepare` created for a submission that did not happen, and their
    links: the next submit creates them again, and MLflow shows no run waiting for a job that never
    existed."""
    if not sweep.tracking_uri or not created:
        return
    client = mlflow_store.client(sweep.tracking_uri)
    for folder in created:
        link = read_link(folder)
        if link is not None:
            client.delete_run(link["run_id"])
            storage.remove(storage.join(folder, LINK))


def _linked_run(client: Any, folder: str, uri: str) -> str | None:
    """The MLflow run that `folder`'s tracking.json names in this store, if it still exists."""
    link = read_link(folder)
    if link is None or link["uri"] != uri:
        return None
    try:
        client.get_run(link["run_id"])
    except Exception as err:
        if mlflow_store.is_permanent(err):
            return None
        raise
    return link["run_id"]
