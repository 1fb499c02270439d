"""The sweep status table (records + scheduler) and log tails."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from dino.eval.results import headline, read_results
from launcher import records
from launcher.grid import RunSpec
from launcher.scheduler import job_is_live, slurm_states
from launcher.sweep_file import Sweep


@dataclass
class RunFiles:
    """What `status` reads of one run, each file once: its record (evaluation states merged), its
    newest pretraining job and what the scheduler says of that job."""

    record: dict[str, Any]
    job: dict[str, Any] | None
    scheduler: str = ""

    @classmethod
    def read(cls, run: RunSpec) -> RunFiles:
        return cls(records.read_record(run.run_dir), records.last_job(run.run_dir))


def read_runs(runs: list[RunSpec]) -> list[RunFiles]:
    """Every run's files, and the scheduler's states of their jobs: one squeue for all SLURM jobs."""
    files = [RunFiles.read(run) for run in runs]
    slurm = slurm_states([f.job["job_id"] for f in files if f.job and f.job["executor"] == "slurm"])
    for f in files:
        if f.job and f.job["executor"] == "slurm":
            f.scheduler = slurm.get(f.job["job_id"], "").lower()
        elif f.job:
            f.scheduler = "alive" if job_is_live(f.job) else ""
    return files


SUSTAINED_WINDOWS = 3
"""Metrics windows in a row with one rank over launcher/jobs.py STRAGGLER_RATIO before `status` flags it."""


def run_state(files: RunFiles) -> str:
    """pending / running / requeued / completed / collapsed / failed / hung / cancelled / lost / new."""
    rec, sched = files.record, files.scheduler
    state = rec.get("state", "new")
    if state == records.HUNG and sched in ("pending", "running"):
        return records.REQUEUED  # the watchdog's requeue, without the hung node (the note says so)
    if state in (records.RUNNING, records.PENDING, records.REQUEUED) and sched == "pending":
        return records.REQUEUED if rec.get("requeues") else records.PENDING
    if state == records.RUNNING and sched == "":
        return "lost"  # the job is gone without saying so (SIGKILL, node failure): `submit` resumes it
    if state == records.PENDING and sched == "" and files.job:
        return "lost"
    return state


def eval_summary(run: RunSpec, protocol: str, record: dict[str, Any]) -> str:
    """Headline of the newest result JSON of a protocol (e.g. k-NN top-1 at k=20), or its state
    (`record`: the run's, read by the caller)."""
    state = record.get("evals", {}).get(protocol, "")
    results = read_results(run.run_dir, protocol) if state == "completed" else []
    if results:
        value = headline(results[-1][1])  # the newest result
        if isinstance(value, int | float):
            return f"{value:.1f}"
    if state == records.SKIPPED:  # a collapsed run's evaluations
        return (
            "skipped (collapsed)" if "collapsed" in records.eval_reason(run.run_dir, protocol) else "skipped"
        )
    return state or "-"


def gpu_hours(record: dict[str, Any]) -> str:
    """Pretraining GPU-hours spent so far / the estimate its submission was checked against
    (launcher/cost/sweep_cost.py; "-" for runs submitted before estimates were kept), and where it came from."""
    from launcher.cost import gpu_hours_text

    spent, estimate = record.get("gpu_hours"), record.get("estimate_gpu_hours")
    if spent is None and estimate is None:
        return "-"
    text = f"{gpu_hours_text(spent or 0.0)} / {gpu_hours_text(estimate) if estimate is not None else '-'}"
    return f"{text} ({record['estimate_source']})" if record.get("estimate_source") else text


SPENT = "GPU-h spent/est."
CODE_CHARS = 8  # of the code hash a run's job imported (launcher/code_snapshot.py): enough to tell runs apart
# Left out of a compact table when no run has anything to say in them.
EMPTY = {SPENT: ("-",), "requeues": ("0",), "job": ("-",), "note": ("",)}


def status_table(sweep: Sweep, runs: list[RunSpec], compact: bool = False) -> Table:
    """One row per run: run, axes, seed, state, step, loss, GPU-hours, requeues, job, code hash, one
    column per evaluation and a note (an error, a hang, where a collapse stopped it, a slow rank, the
    last heartbeat).

    `compact` (what `sweep status` prints unless --wide) fits a terminal: it leaves out the axis and
    seed columns (the run's name spells them: m0.996-nl0-bs32, -s1 with several seeds) and the
    GPU-hours, requeues, job and note columns when every run's is empty and the code column when every
    run's is the same, and names them under the table.
    """
    axes = [*sweep.grid, *sweep.zip]
    headers = [
        "run",
        *axes,
        "seed",
        "state",
        "step",
        "loss",
        SPENT,
        "requeues",
        "job",
        "code",
        *sweep.evals,
        "note",
    ]
    rows: list[list[str | Text]] = []
    counts: dict[str, int] = {}
    for run, files in zip(runs, read_runs(runs), strict=True):
        rec, job = files.record, files.job
        state = run_state(files)
        counts[state] = counts.get(state, 0) + 1
        total = rec.get("total_steps") or 0
        step = rec.get("step", 0)
        progress = f"{step}/{total} ({100 * step / total:.0f}%)" if total else str(step or "-")
        loss = f"{rec['loss']:.3f}" if rec.get("loss") is not None else "-"
        note = ""
        if state in (records.FAILED, records.HUNG) and rec.get("error"):
            note = " | ".join(rec["error"].strip().splitlines()[-2:])
        elif state == records.REQUEUED and rec.get("state") == records.HUNG:
            note = rec.get("error", "")
        elif state == records.PRUNED:
            note = pruned_note(rec)
        elif state == records.PAUSED:
            rungs = rec.get("rungs") or {}
            note = f"at step {rec.get('step')}" + (
                f", rung {max(rungs, key=float)}: waiting for its decision" if rungs else ""
            )
        elif state == records.COLLAPSED:
            note = f"collapsed at step {rec.get('collapse_step')}: {rec.get('collapse_signal', '')}"
        elif state == records.RUNNING and straggler_note(rec):
            note = straggler_note(rec)
        elif state in (records.RUNNING,) and rec.get("heartbeat"):
            note = f"heartbeat {time.time() - rec['heartbeat']:.0f}s ago"
        colour = {
            "completed": "green",
            "failed": "red",
            "hung": "red",
            "lost": "red",
            "running": "cyan",
            "requeued": "yellow",
            "collapsed": "magenta",
            "pruned": "bright_black",
            "paused": "yellow",
        }.get(state, "")
        # Plain Text cells: an error such as gloo's "[/…/pair.cc:561] Connection closed by peer"
        # or an axis value like "[5, 10]" is not rich markup.
        rows.append([
            *map(Text, (run.name, *(str(run.axes[a]) for a in axes), str(run.seed))),
            Text(state, style=colour), progress, loss, gpu_hours(rec), str(rec.get("requeues", 0)),
            job["job_id"] if job else "-", rec.get("code_hash", "-")[:CODE_CHARS],
            *(eval_summary(run, p, rec) for p in sweep.evals), Text(note),
        ])  # fmt: skip
    hidden: list[str] = []
    if compact:
        cells = {h: [str(row[i]) for row in rows] for i, h in enumerate(headers)}
        hidden = [*axes, "seed"] + [h for h, empty in EMPTY.items() if all(c in empty for c in cells[h])]
        if len(set(cells["code"])) <= 1:  # one code version (or none recorded): nothing to tell apart
            hidden.append("code")
    table = Table(title=f"sweep {sweep.name} ({sweep.folder})", title_justify="left")
    shown = [i for i, h in enumerate(headers) if h not in hidden]
    for i in shown:
        # Compact: each run one line. Only the note and, when too long for the terminal, the run's
        # name fold; the other cells are short and stay whole.
        table.add_column(headers[i], overflow="fold", no_wrap=compact and headers[i] not in ("run", "note"))
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    table.caption = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if hidden:
        table.caption += f"\n--wide also shows: {', '.join(hidden)}"
    return table


def pruned_note(record: dict[str, Any]) -> str:
    """A pruned run's note, "at 20%: 41.2 (cell), 0.8 GPU-h saved": the rung, its cell's mean value
    of the search metric there and the GPU-hours not spent (launcher/halving.py)."""
    from launcher.cost import gpu_hours_text

    value = record.get("cell_value")
    shown = f"{value:.4g}" if isinstance(value, int | float) else "none (no value at the rung)"
    return (
        f"at {record.get('pruned_at', 0):.0%}: {shown} (cell), {gpu_hours_text(record.get('saved_gpu_hours') or 0.0)} "
        "GPU-h saved"
    )


def straggler_note(record: dict[str, Any]) -> str:
    """ "slow rank 1 on n2: 2.4x the others' step time (5 windows)" once one rank has been the slow one
    for SUSTAINED_WINDOWS windows in a row (launcher/jobs.py keeps the count); "" otherwise."""
    slow = record.get("straggler") or {}
    if slow.get("windows", 0) < SUSTAINED_WINDOWS:
        return ""
    return (
        f"slow rank {slow['rank']} on {slow.get('host') or '?'}: {slow['ratio']:.1f}x the others' step time "
        f"({slow['windows']} windows)"
    )


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
