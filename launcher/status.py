"""The sweep status table (records + scheduler) and log tails."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from dino.eval.results import read_results
from launcher import records
from launcher.plan import _slurm_state, job_is_live
from launcher.sweep import RunSpec, Sweep


def scheduler_state(job: dict[str, Any] | None) -> str:
    """What the scheduler says of a run's newest job (SLURM: squeue; local: process alive)."""
    if not job:
        return ""
    if job["executor"] == "slurm":
        return _slurm_state(job["job_id"]).lower()
    return "alive" if job_is_live(job) else ""


def run_state(run: RunSpec) -> str:
    """pending / running / requeued / preempted / completed / collapsed / failed / cancelled / lost / new."""
    rec = records.read_record(run.run_dir)
    state = rec.get("state", "new")
    sched = scheduler_state(records.last_job(run.run_dir))
    if state in (records.RUNNING, records.PENDING, records.REQUEUED) and sched == "pending":
        return records.REQUEUED if rec.get("requeues") else records.PENDING
    if state == records.RUNNING and sched == "":
        return "lost"  # the job is gone without saying so (SIGKILL, node failure): `submit` resumes it
    if state == records.PENDING and sched == "" and records.last_job(run.run_dir):
        return "lost"
    return state


def eval_summary(run: RunSpec, protocol: str) -> str:
    """Headline of the newest result JSON of a protocol (e.g. k-NN top-1 at k=20), or its state."""
    state = records.read_record(run.run_dir).get("evals", {}).get(protocol, "")
    results = read_results(run.run_dir, protocol) if state == "completed" else []
    if results:
        headline = _headline(results[-1][1])  # the newest result
        if headline:
            return headline
    if state == records.SKIPPED:  # a collapsed run's evaluations
        return (
            "skipped (collapsed)" if "collapsed" in records.eval_reason(run.run_dir, protocol) else "skipped"
        )
    return state or "-"


def _headline(result: dict[str, Any]) -> str:
    """k-NN: top-1 at k = 20 (the paper's headline); linear: the final top-1."""
    for key in ("top1", "final_top1", "top1_final", "accuracy"):
        value = _find(result, key)
        if isinstance(value, dict):
            value = value.get("20", next(iter(value.values()), None))
        if isinstance(value, int | float):
            return f"{value:.1f}"
    return ""


def _find(tree: Any, key: str) -> Any:
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def status_table(sweep: Sweep, runs: list[RunSpec]) -> Table:
    table = Table(title=f"sweep {sweep.name} ({sweep.folder})", title_justify="left")
    axes = [*sweep.grid, *sweep.zip]
    for col in ("run", *axes, "seed", "state", "step", "loss", "requeues", "job", *sweep.evals, "note"):
        table.add_column(col, overflow="fold")
    counts: dict[str, int] = {}
    for run in runs:
        rec = records.read_record(run.run_dir)
        state = run_state(run)
        counts[state] = counts.get(state, 0) + 1
        total = rec.get("total_steps") or 0
        step = rec.get("step", 0)
        progress = f"{step}/{total} ({100 * step / total:.0f}%)" if total else str(step or "-")
        loss = f"{rec['loss']:.3f}" if rec.get("loss") is not None else "-"
        job = records.last_job(run.run_dir)
        note = ""
        if state == records.FAILED and rec.get("error"):
            note = " | ".join(rec["error"].strip().splitlines()[-2:])
        elif state == records.COLLAPSED:
            note = f"collapsed at step {rec.get('collapse_step')}: {rec.get('collapse_signal', '')}"
        elif state in (records.RUNNING,) and rec.get("heartbeat"):
            note = f"heartbeat {time.time() - rec['heartbeat']:.0f}s ago"
        colour = {
            "completed": "green",
            "failed": "red",
            "lost": "red",
            "running": "cyan",
            "requeued": "yellow",
            "collapsed": "magenta",
        }.get(state, "")
        # Plain Text cells: an error such as gloo's "[/…/pair.cc:561] Connection closed by peer"
        # or an axis value like "[5, 10]" is not rich markup.
        table.add_row(
            *map(Text, (run.name, *(str(run.axes[a]) for a in axes), str(run.seed))),
            Text(state, style=colour), progress, loss, str(rec.get("requeues", 0)),
            job["job_id"] if job else "-", *(eval_summary(run, p) for p in sweep.evals), Text(note),
        )  # fmt: skip
    table.caption = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return table


def log_tail(run: RunSpec, stage: str, lines: int) -> str:
    job = records.last_job(run.run_dir, stage)
    if not job:
        return f"{run.label}: no {stage} job submitted yet"
    parts = []
    for kind in ("stdout", "stderr"):
        path = job[kind]
        text = (
            Path(path).read_text(errors="replace") if os.path.exists(path) else f"({path} does not exist yet)"
        )
        tail = "\n".join(text.splitlines()[-lines:])
        parts.append(f"==> {path} <==\n{tail}")
    return f"{run.label} {stage} job {job['job_id']}\n" + "\n\n".join(parts)
