"""Classify a sweep's runs (new / resume / finished / active / failed), submit them, wait, cancel.

Every command is idempotent because the decision comes from the run folders: record.json (what
the job reported), jobs.json (what was submitted) and the checkpoints. Finished runs are skipped,
unfinished ones resumed, runs with a live job left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from dino import checkpoint
from launcher import records, tracking_runs
from launcher.errors import UserError
from launcher.executors import build_executor
from launcher.jobs import EvalJob, TrainJob
from launcher.sweep import RunSpec, Sweep

NEW, RESUME, FINISHED, ACTIVE, FAILED = "new", "resume", "finished", "active", "failed"
COLLAPSED = "collapsed"  # stopped by the collapse guard: done, its evaluations skipped
LIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "RESIZING",
}


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


class SchedulerError(UserError):
    """SLURM did not answer or refused (sbatch, squeue, scancel); the message is its own."""


def _slurm_message(stderr: str) -> str:
    """The last line SLURM wrote, without the tool's prefix."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _slurm_state(job_id: str) -> str:
    """squeue's state of a job ("" once it left the queue, or where there is no SLURM client).
    A controller that does not answer is an error: a job it cannot see may still run."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        return ""
    except subprocess.TimeoutExpired:
        raise SchedulerError(
            f"squeue -j {job_id} did not answer in 60 s: is the SLURM controller up?"
        ) from None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise SchedulerError(
            f"squeue failed (exit {out.returncode}) asking for job {job_id}: {_slurm_message(out.stderr)}"
        )
    states = {s.strip() for s in out.stdout.split()}
    return next(iter(states)) if states else ""


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """squeue's state of many jobs in one call per 500 (a 1,000-run status asked once per run took
    seconds); jobs that left the queue are absent. A job id the controller has forgotten makes
    squeue refuse the whole list: then each job is asked alone."""
    wanted = sorted(set(job_ids))
    states: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        try:
            out = subprocess.run(
                ["squeue", "-h", "-r", "-j", ",".join(chunk), "-o", "%i %T"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        except FileNotFoundError:
            return {}
        except subprocess.TimeoutExpired:
            raise SchedulerError("squeue did not answer in 60 s: is the SLURM controller up?") from None
        if out.returncode != 0:
            if "Invalid job id" not in out.stderr:
                asked = (
                    f" {chunk[0]}"
                    if len(chunk) == 1
                    else f"s {', '.join(chunk[:3])}{', …' * (len(chunk) > 3)}"
                )
                raise SchedulerError(
                    f"squeue failed (exit {out.returncode}) asking for job{asked}: {_slurm_message(out.stderr)}"
                )
            states.update({job: _slurm_state(job) for job in chunk})
            continue
        for line in out.stdout.splitlines():
            job, _, state = line.strip().partition(" ")
            if job in chunk:
                states[job] = state
    return {job: state for job, state in states.items() if state}


def job_is_live(job: dict[str, Any] | None) -> bool:
    if not job:
        return False
    if job["executor"] == "slurm":
        return _slurm_state(job["job_id"]) in LIVE_SLURM_STATES
    if job["executor"] == "local":
        try:
            os.kill(int(job["job_id"]), 0)  # the local job id is its controller's pid
            return True
        except (ProcessLookupError, ValueError, PermissionError):
            return False
    return False


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
        elif record.get("state") == records.FAILED:
            todos.append(Todo(run, FAILED, evals))
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
                  FAILED: "retry (failed)", COLLAPSED: f"skip (collapsed {todo.note})"}[todo.action]  # fmt: skip
        table.add_row(r.name, r.run_id, *(str(r.axes[k]) for k in (*sweep.grid, *sweep.zip)), str(r.seed), action,
                      ", ".join(todo.evals) or "-")  # fmt: skip
    gpus = f"{res.gpus_per_node} GPU x " if res.gpus_per_node else ""
    table.caption = (
        f"pretrain: {res.nodes} node(s) x {gpus}{res.tasks_per_node} task(s), {res.cpus_per_task} CPU/task, "
        f"{res.mem_gb} GB, {res.timeout_min} min, partition {res.partition or 'default'}; "
        f"array parallelism {sweep.array_parallelism}; max timeouts {sweep.max_timeouts}"
    )
    return table


@dataclass
class Submitted:
    pretrain: list[tuple[RunSpec, Any]] = field(default_factory=list)
    evals: list[tuple[RunSpec, str, Any]] = field(default_factory=list)
    skipped: list[Todo] = field(default_factory=list)

    def summary(self) -> str:
        ids = sorted({str(j.job_id).split("_")[0] for _, j in self.pretrain})
        lines = [f"submitted {len(self.pretrain)} pretraining job(s) {' '.join(ids)}".rstrip()]
        if self.evals:
            lines.append(
                f"submitted {len(self.evals)} evaluation job(s) ({', '.join(sorted({p for _, p, _ in self.evals}))})"
            )
        for todo in self.skipped:
            lines.append(f"skipped {todo.run.label}: {' '.join(filter(None, (todo.action, todo.note)))}")
        return "\n".join(lines)


def _record_submission(run: RunSpec, stage: str, job: Any, executor: str) -> None:
    records.add_job(
        run.run_dir, stage, str(job.job_id), executor, str(job.paths.stdout), str(job.paths.stderr)
    )


def to_submit(todos: list[Todo], only: str | None = None) -> tuple[list[Todo], list[Todo]]:
    """(runs to (re)train, finished runs that only need evaluations) of a submission."""
    wanted = {"new": {NEW}, "unfinished": {RESUME, FAILED}, "failed": {FAILED}}.get(
        only or "", {NEW, RESUME, FAILED}
    )
    train = [t for t in todos if t.action in wanted]
    return train, [t for t in todos if t.action == FINISHED and t.evals and not only]


def submit(
    sweep: Sweep, todos: list[Todo], executor: str, only: str | None = None,
    estimates: dict[str, dict[str, Any]] | None = None,
) -> Submitted:  # fmt: skip
    """One array for the pretraining runs, one per evaluation; evaluations of runs being trained wait
    for their own run (SLURM `aftercorr` on the pretrain array; locally a wait on the run record).
    `estimates` (run id -> launcher.cost.record_fields) go into each (re)trained run's record and
    MLflow tags, for `status` and `report` to show beside the GPU-hours spent."""
    train, eval_only = to_submit(todos, only)
    out = Submitted(skipped=[t for t in todos if t not in train and t not in eval_only])
    before = {t.run.run_dir: records.snapshot(t.run.run_dir) for t in [*train, *eval_only]}
    created: list[str] = []
    try:
        _submit_arrays(sweep, train, eval_only, executor, out, created, estimates or {})
    except Exception as err:
        # All or nothing: a refused array leaves no job queued, no record changed, no MLflow run.
        for job in [j for _, j in out.pretrain] + [j for _, _, j in out.evals]:
            with contextlib.suppress(Exception):  # the refusal is what the user must see
                _cancel_job({"executor": executor, "job_id": str(job.job_id)}, {})
        for run_dir, files in before.items():
            records.restore(run_dir, files)
        tracking_runs.rollback(sweep, created)
        if isinstance(err, SubmitRefused):
            raise SchedulerError(f"{sweep.path}: {err}; nothing was submitted") from None
        raise
    return out


class SubmitRefused(RuntimeError):
    """sbatch (or the local executor) refused an array; the message names the stage and the reason."""


def _submit_array(ex: Any, stage: str, executor: str, jobs: list[Any]) -> list[Any]:
    """Submit `jobs` as one array; SubmitRefused with the scheduler's own message when refused."""
    import submitit

    try:
        with ex.batch():
            return [ex.submit(job) for job in jobs]
    except (submitit.core.utils.FailedJobError, OSError) as err:
        res = ex._executor.parameters if executor == "slurm" else {}
        where = f" (partition {res['partition']})" if res.get("partition") else ""
        raise SubmitRefused(
            f"{executor} refused the {stage} array{where}: {_slurm_message(str(err))}"
        ) from None


def _submit_arrays(sweep, train, eval_only, executor, out, created, estimates) -> None:
    folder = submitit_folder(sweep)
    local_slots = sweep.array_parallelism if executor == "local" else 0
    # Experiment, parent and child MLflow runs exist before any job starts (no races between jobs).
    tags = {
        run_id: {f"dinolab.{k}": str(v) for k, v in fields.items()} for run_id, fields in estimates.items()
    }
    tracking_runs.prepare(sweep, [t.run for t in [*train, *eval_only]], created, tags)
    for todo in train:  # fresh record state for the runs about to be (re)submitted
        # Evaluations chained to an earlier attempt wait on a pretraining that will never succeed.
        for job in records.read_jobs(todo.run.run_dir):
            if job["stage"] != "pretrain" and job_is_live(job):
                _cancel_job(job, records.read_record(todo.run.run_dir))
        records.update_record(todo.run.run_dir, state=records.PENDING, error="", evals={},
                              **estimates.get(todo.run.run_id, {}))  # fmt: skip
        records.reset_evals(todo.run.run_dir)
    if train:
        ex = build_executor(sweep, "pretrain", executor, folder)
        jobs = _submit_array(ex, "pretrain", executor,
                             [TrainJob(t.run.overrides, t.run.run_dir, local_slots, slots_folder(sweep)) for t in train])  # fmt: skip
        for todo, job in zip(train, jobs, strict=True):
            _record_submission(todo.run, "pretrain", job, executor)
            out.pretrain.append((todo.run, job))
    for protocol in sweep.evals:
        # Every run (re)trained now needs this evaluation again, on its final checkpoint; keeping the
        # eval array the same size and order as the pretrain array lets SLURM pair task i with task i.
        chained = [(t, j) for t, (_, j) in zip(train, out.pretrain, strict=True)]
        alone = [t for t in eval_only if protocol in t.evals]
        overrides = sweep.eval_overrides.get(protocol, [])
        if chained:
            ex = build_executor(sweep, protocol, executor, folder)
            if executor == "slurm":
                array_id = str(chained[0][1].job_id).split("_")[0]
                extra = dict(
                    ex._executor.parameters.get("additional_parameters", {}),
                    dependency=f"aftercorr:{array_id}",
                )
                ex.update_parameters(slurm_additional_parameters=extra)
            jobs = _submit_array(ex, protocol, executor,
                                 [EvalJob(protocol, t.run.run_dir, overrides, executor != "slurm", local_slots,
                                          slots_folder(sweep)) for t, _ in chained])  # fmt: skip
            for (todo, _), job in zip(chained, jobs, strict=True):
                _record_submission(todo.run, protocol, job, executor)
                out.evals.append((todo.run, protocol, job))
        if alone:
            ex = build_executor(sweep, protocol, executor, folder)
            jobs = _submit_array(ex, protocol, executor,
                                 [EvalJob(protocol, t.run.run_dir, overrides, False, local_slots, slots_folder(sweep))
                                  for t in alone])  # fmt: skip
            for todo, job in zip(alone, jobs, strict=True):
                _record_submission(todo.run, protocol, job, executor)
                out.evals.append((todo.run, protocol, job))


def wait(sweep: Sweep, runs: list[RunSpec], submitted: Submitted, console) -> bool:
    """Wait for every submitted job with a progress bar per run; True when all succeeded."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    jobs = [(run, "pretrain", job) for run, job in submitted.pretrain] + list(submitted.evals)
    if not jobs:
        return True
    ok = True
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as progress:  # fmt: skip
        tasks = {
            run.run_id: progress.add_task(run.name, total=1, info="pending") for run, _ in submitted.pretrain
        }
        pending = list(jobs)
        while pending:
            for run, stage, job in list(pending):
                if executor_is_debug(job):
                    _result(job)  # the debug executor runs jobs in this process, on demand
                if job.done():
                    pending.remove((run, stage, job))
                    try:
                        job.result()
                    except Exception as err:  # noqa: BLE001 - shown, then the others go on
                        ok = False
                        console.print(
                            f"[red]{run.label} {stage} failed:[/red] {str(err).strip().splitlines()[-1]}"
                        )
            for run, _ in submitted.pretrain:
                rec = records.read_record(run.run_dir)
                total = rec.get("total_steps") or 1
                evals = rec.get("evals", {})
                info = f"{rec.get('state', 'pending')} step {rec.get('step', 0)}/{total}"
                if rec.get("loss") is not None:
                    info += f" loss {rec['loss']:.3f}"
                if evals:
                    info += " " + " ".join(f"{p}:{s}" for p, s in evals.items())
                progress.update(tasks[run.run_id], completed=rec.get("step", 0), total=total, info=info)
            if pending:
                time.sleep(1.0)
    return ok


def executor_is_debug(job: Any) -> bool:
    return type(job).__name__ == "DebugJob"


def _result(job: Any) -> None:
    with contextlib.suppress(Exception):  # failures are reported by wait()
        job.result()


def _cancel_job(job: dict[str, Any], record: dict[str, Any]) -> None:
    if job["executor"] == "slurm":
        out = subprocess.run(["scancel", job["job_id"]], capture_output=True, text=True, check=False)
        if (
            out.returncode != 0
            and "Invalid job id" not in out.stderr
            and "already completing" not in out.stderr
        ):
            raise SchedulerError(f"scancel {job['job_id']} failed: {_slurm_message(out.stderr)}")
        return
    for pid in (record.get("pid"), int(job["job_id"])):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)


def cancel(runs: list[RunSpec]) -> list[str]:
    """Cancel every live job of the runs (SLURM: scancel; local: SIGTERM to the job's processes)."""
    lines = []
    for run in runs:
        for job in records.read_jobs(run.run_dir):
            if not job_is_live(job):
                continue
            _cancel_job(job, records.read_record(run.run_dir))
            records.update_record(run.run_dir, state=records.CANCELLED)
            lines.append(f"cancelled {run.label} {job['stage']} job {job['job_id']}")
    return lines or ["no live jobs"]
