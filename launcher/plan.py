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
# A search (launcher/halving.py): pruned at a rung (skipped; `--only pruned` revives it), or at its
# rung already, waiting for the rung's decision (nothing to train).
PRUNED, AWAIT = "pruned", "await"


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
    stop_at: float = 0.0
    """A search's rung this submission trains the run to (train.stop_at; 0: to the end)."""
    rung: int = -1
    """The index of that rung in search.rungs (-1: not a search)."""


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
        # A hang the watchdog did not requeue (local executor, or its requeues used up): a failure.
        elif record.get("state") in (records.FAILED, records.HUNG):
            todos.append(Todo(run, FAILED, evals, note=record["state"]))
        elif record or checkpoint.list_steps(run.run_dir):
            todos.append(Todo(run, RESUME, evals))
        else:
            todos.append(Todo(run, NEW, evals))
    return (
        _searched(sweep, todos, {run.run_id: record for run, record, _ in seen})
        if sweep.search.halving
        else todos
    )


def _searched(sweep: Sweep, todos: list[Todo], records_by_id: dict[str, dict[str, Any]]) -> list[Todo]:
    """A halving search's plan: each run trains only to its next rung (no evaluations before the
    last), a run at its rung waits for the decision, a pruned run is skipped."""
    from launcher import halving

    state, rungs = halving.read_state(sweep), sweep.search.rungs
    out = []
    for todo in todos:
        if todo.action in (FINISHED, ACTIVE, COLLAPSED):
            out.append(todo)
            continue
        record = records_by_id[todo.run.run_id]
        k = halving.target_rung(todo.run.run_id, state, rungs)
        if k is None:
            out.append(Todo(todo.run, PRUNED, todo.evals, note=f"at {record.get('pruned_at', 0):.0%}"))
        elif k == len(rungs) - 1:
            out.append(Todo(todo.run, todo.action, todo.evals, todo.note, 0.0, k))
        elif halving.fraction_key(rungs[k]) in (record.get("rungs") or {}):
            out.append(Todo(todo.run, AWAIT, note=f"rung {rungs[k]:.0%}", rung=k))
        else:
            out.append(Todo(todo.run, todo.action, [], todo.note, rungs[k], k))
    return out


def plan_table(sweep: Sweep, runs: list[RunSpec], todos: list[Todo] | None = None) -> Table:
    todos = todos or classify(sweep, runs)
    res = sweep.stage_resources("pretrain")
    table = Table(title=f"sweep {sweep.name}: {len(runs)} runs", title_justify="left")
    for col in ("run", "id", *sweep.grid, *sweep.zip, "seed", "action", "evals"):
        table.add_column(col)
    for todo in todos:
        r = todo.run
        action = {NEW: "new", RESUME: "resume", FINISHED: "skip (finished)", ACTIVE: "skip (job live)",
                  FAILED: f"retry ({todo.note})", COLLAPSED: f"skip (collapsed {todo.note})",
                  PRUNED: f"skip (pruned {todo.note})", AWAIT: f"decide ({todo.note})"}[todo.action]  # fmt: skip
        if todo.stop_at:
            action += f" to {todo.stop_at:.0%}"
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
    wanted = {"new": {NEW}, "unfinished": {RESUME, FAILED}, "failed": {FAILED}, "pruned": {PRUNED}}.get(
        only or "", {NEW, RESUME, FAILED}
    )
    train = [t for t in todos if t.action in wanted]
    return train, [t for t in todos if t.action == FINISHED and t.evals and not only]
