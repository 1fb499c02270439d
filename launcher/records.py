"""Run records: what a job reports (`record.json`) and what the launcher submitted (`jobs.json`).

This module is the only one that writes record files; jobs and the launcher call its named
functions. Each file has one writer role, so a job starting while `submit` is still writing can
never lose an update: the pretraining job owns `record.json` while it runs (state, step, loss,
requeues, heartbeat, error: `update_record`), and the launcher touches it only when no job of the
run is live (`mark_pending` before submitting, `mark_cancelled` after stopping the job, `restore`
after a refused submission); each evaluation job owns its own `record-<protocol>.json` (k-NN and
linear jobs of one run may finish together; in one shared file one could overwrite the other's
state); the launcher owns `jobs.json` (every submission: stage, job id, executor, log paths, time:
`add_job`). All are written atomically through `dino.io.storage`; `read_record` shows the evaluation
states as the record's `evals`.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from dino.io import storage

RECORD = "record.json"
JOBS = "jobs.json"

# Run states, as the job reports them (and `cancelled`, as `sweep cancel` sets it). `collapsed`: the
# collapse guard stopped the run early (dino/method/collapse.py), a decision like `completed`, never resubmitted.
PENDING, RUNNING, REQUEUED, COMPLETED, FAILED = "pending", "running", "requeued", "completed", "failed"
CANCELLED, COLLAPSED = "cancelled", "collapsed"
# `hung`: the progress watchdog stopped the job (a rank made no progress for train.hang_timeout_s,
# dino/io/watchdog.py); on SLURM the job is requeued without that rank's node (launcher/jobs.py),
# elsewhere `sweep submit` resumes it like a failed run.
HUNG = "hung"
# A search's rungs (launcher/halving.py): `paused` at a rung with a complete checkpoint and the
# search metric (record `rungs`), waiting for the decision; `pruned` by it (a decision like
# `completed`: never resubmitted, unless `--only pruned`).
PAUSED, PRUNED = "paused", "pruned"
DONE = (COMPLETED, COLLAPSED)  # pretraining that will not run again
# Evaluation states: running / completed / failed, and `skipped` (with a reason: the run collapsed).
SKIPPED = "skipped"
EVAL_PROTOCOLS = ("knn", "linear")


def eval_record(protocol: str) -> str:
    """File name of one evaluation's state."""
    return f"record-{protocol}.json"


def read_record(run_dir: str) -> dict[str, Any]:
    """record.json, with `evals` ({protocol: state}) read from each evaluation's own file (older
    runs kept them in record.json itself, still read)."""
    record = storage.read_json(storage.join(run_dir, RECORD), {})
    evals = dict(record.get("evals", {}))
    for protocol in EVAL_PROTOCOLS:
        own = storage.read_json(storage.join(run_dir, eval_record(protocol)), {})
        if own.get("state"):
            evals[protocol] = own["state"]
    if evals or "evals" in record:
        record["evals"] = evals
    return record


def set_eval_state(run_dir: str, protocol: str, state: str, reason: str = "", **extra: Any) -> None:
    """The state of one evaluation of the run (its job is the file's only writer), why it was skipped
    or stopped, and `extra` fields (a hang's rank and node)."""
    # The hang count survives the requeued job's "running": it bounds the requeues.
    kept = {k: v for k, v in read_eval_record(run_dir, protocol).items() if k == "hangs"}
    content = {**kept, **extra, "state": state, "heartbeat": time.time(), "host": socket.gethostname()}
    if reason:
        content["reason"] = reason
    storage.atomic_write_text(storage.join(run_dir, eval_record(protocol)), json.dumps(content, indent=1))


def read_eval_record(run_dir: str, protocol: str) -> dict[str, Any]:
    """One evaluation's own record (empty when it never ran)."""
    return storage.read_json(storage.join(run_dir, eval_record(protocol)), {})


def eval_reason(run_dir: str, protocol: str) -> str:
    """Why an evaluation was skipped ("" when it was not)."""
    return storage.read_json(storage.join(run_dir, eval_record(protocol)), {}).get("reason", "")


def reset_evals(run_dir: str) -> None:
    """Forget the evaluation states (a run about to be trained again will be evaluated again)."""
    for protocol in EVAL_PROTOCOLS:
        storage.remove(storage.join(run_dir, eval_record(protocol)))


def update_record(run_dir: str, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into record.json (job side) and stamp the heartbeat."""
    record = read_record(run_dir)
    record.update(changes)
    record["heartbeat"] = time.time()
    record["host"] = socket.gethostname()
    storage.makedirs(run_dir)
    storage.atomic_write_text(storage.join(run_dir, RECORD), json.dumps(record, indent=1))
    return record


def mark_pending(run_dir: str, estimates: dict[str, Any]) -> None:
    """The launcher is about to (re)submit the run: state `pending`, no error, its cost estimates
    (`launcher.cost.record_fields`), and every evaluation to run again."""
    update_record(run_dir, state=PENDING, error="", evals={}, **estimates)
    reset_evals(run_dir)


def mark_cancelled(run_dir: str) -> None:
    """`sweep cancel` stopped the run's job."""
    update_record(run_dir, state=CANCELLED)


def snapshot(run_dir: str) -> dict[str, str | None]:
    """The run's record files as they are (None: absent), for `restore`."""
    files = {}
    for name in (RECORD, JOBS, *map(eval_record, EVAL_PROTOCOLS)):
        path = storage.join(run_dir, name)
        files[name] = storage.read_text(path) if storage.exists(path) else None
    return files


def restore(run_dir: str, files: dict[str, str | None]) -> None:
    """Put back what `snapshot` saw (a submission that did not happen leaves no trace)."""
    for name, text in files.items():
        path = storage.join(run_dir, name)
        if text is None:
            if storage.exists(path):
                storage.remove(path)
        else:
            storage.atomic_write_text(path, text)


def read_jobs(run_dir: str) -> list[dict[str, Any]]:
    return storage.read_json(storage.join(run_dir, JOBS), [])


def add_job(run_dir: str, stage: str, job_id: str, executor: str, stdout: str, stderr: str) -> None:
    jobs = read_jobs(run_dir)
    jobs.append({"stage": stage, "job_id": job_id, "executor": executor, "stdout": stdout,
                 "stderr": stderr, "submitted": time.time()})  # fmt: skip
    storage.makedirs(run_dir)
    storage.atomic_write_text(storage.join(run_dir, JOBS), json.dumps(jobs, indent=1))


def newest_jobs(run_dir: str) -> dict[str, dict[str, Any]]:
    """The newest submitted job of each stage of the run (jobs.json read once)."""
    return {job["stage"]: job for job in read_jobs(run_dir)}


def last_job(run_dir: str, stage: str = "pretrain") -> dict[str, Any] | None:
    return newest_jobs(run_dir).get(stage)
