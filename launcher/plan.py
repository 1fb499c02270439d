"""Classify a sweep's runs (new / resume / finished / active / failed / collapsed) and show the plan.

Every command is idempotent because the decision comes from the run folders: record.json (what
the job reported), jobs.json (what was submitted) and the checkpoints. Finished runs are skipped,
unfinished ones resumed, runs with a live job left alone. Submitting the plan is
`launcher/submission.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from dino.io import checkpoint
from launcher import records
from launcher.grid import RunSpec
from launcher.scheduler import LIVE_SLURM_STATES, job_is_live, slurm_states
from launcher.sweep_file import Sweep

NEW, RESUME, FINISHED, ACTIVE, FAILED = "new", "resume", "finished", "active", "failed"
COLLAPSED = "collapsed"  # stopped by the collapse guard: done, its evaluations skipped


def submitit_folder(sweep: Sweep) -> str:
    return os.path.join(sweep.local_folder, ".submitit", "%j")


def slots_folder(sweep: Sweep) -> str:
    return os.path.join(sweep.local_folder, ".slots")


@dataclass
class Todo:
    run: RunSpec
    action: str
    evals: list[str] = field(default_factory=list)  # evaluations still to run after (or without) pretraining
    note: str = ""


def is_finished(run: RunSpec, record: dict[str, Any]) -> bool:
    if record.get("state") == records.COMPLETED:
        return True
    total = record.get("total_steps")
    return bool(total) and total in checkpoint.complete_steps(run.run_dir)


def missing_evals(sweep: Sweep, record: dict[str, Any]) -> list[str]:
    done = record.get("evals", {})
    return [p for p in sweep.evals if done.get(p) != "completed"]


def classify(sweep: Sweep, runs: list[RunSpec]) -> list[Todo]:
    """Each run's files read once; SLURM asked once for all their jobs (not once per run)."""
    seen = [(run, records.read_record(run.run_dir), records.newest_jobs(run.run_dir)) for run in runs]
    slurm = slurm_states(
        [j["job_id"] for _, _, jobs in seen for j in jobs.values() if j["executor"] == "slurm"]
    )

    def live(job: dict[str, Any] | None) -> bool:
        if job and job["executor"] == "slurm":
            return slurm.get(job["job_id"], "") in LIVE_SLURM_STATES
        return job_is_live(job)

    todos = []
    for run, record, jobs in seen:
        evals = missing_evals(sweep, record)
        if record.get("state") == records.COLLAPSED and run.config.train.collapse_stop:
            # Resubmitting would only print "collapsed" again; train.collapse_stop=false resumes it.
            todos.append(
                Todo(run, COLLAPSED, note=f"at step {record.get('collapse_step', record.get('step'))}")
            )
        elif is_finished(run, record):
            live_eval = any(live(jobs.get(p)) for p in evals)
            todos.append(Todo(run, ACTIVE if live_eval else FINISHED, [] if live_eval else evals))
        elif live(jobs.get("pretrain")):
            todos.append(Todo(run, ACTIVE))
        elif record.get("state") in (
            records.FAILED,
            records.HUNG,
        ):  # a hang not requeued: retried like a failure
            todos.append(Todo(run, FAILED, evals, note=record["state"]))
        elif record or checkpoint.list_steps(run.run_dir):
            todos.append(Todo(run, RESUME, evals))
        else:
            todos.append(Todo(run, NEW, evals))
    return todos


def plan_table(sweep: Sweep, runs: list[RunSpec], todos: list[Todo] | None = None) -> Table:
    todos = todos or classify(sweep, runs)
    res = sweep.stage_resources("pretrain")
    table = Table(title=f"sweep {sweep.name}: {len(runs)} runs", title_justify="left")
    for col in ("run", "id", *sweep.grid, *sweep.zip, "seed", "action", "evals"):
        table.add_column(col)
    for todo in todos:
        r = todo.run
        action = {NEW: "new", RESUME: "resume", FINISHED: "skip (finished)", ACTIVE: "skip (job live)",
                  FAILED: f"retry ({todo.note})", COLLAPSED: f"skip (collapsed {todo.note})"}[todo.action]  # fmt: skip
        table.add_row(r.name, r.run_id, *(str(r.axes[k]) for k in (*sweep.grid, *sweep.zip)), str(r.seed), action,
                      ", ".join(todo.evals) or "-")  # fmt: skip
    gpus = f"{res.gpus_per_node} GPU x " if res.gpus_per_node else ""
    table.caption = (
        f"pretrain: {res.nodes} node(s) x {gpus}{res.tasks_per_node} task(s), {res.cpus_per_task} CPU/task, "
        f"{res.mem_gb} GB, {res.timeout_min} min, partition {res.partition or 'default'}; "
        f"array parallelism {sweep.array_parallelism}; max timeouts {sweep.max_timeouts}"
    )
    return table


def to_submit(todos: list[Todo], only: str | None = None) -> tuple[list[Todo], list[Todo]]:
    """(runs to (re)train, finished runs that only need evaluations) of a submission."""
    wanted = {"new": {NEW}, "unfinished": {RESUME, FAILED}, "failed": {FAILED}}.get(
        only or "", {NEW, RESUME, FAILED}
    )
    train = [t for t in todos if t.action in wanted]
    return train, [t for t in todos if t.action == FINISHED and t.evals and not only]
