"""Submit a plan (all or nothing), wait for its jobs, cancel a sweep's live jobs.

The launcher's side of the run records goes through `launcher/records.py` (`mark_pending`,
`mark_cancelled`, `restore`, `add_job`); the scheduler through `launcher/scheduler.py`; the code the
jobs import through `launcher/code_snapshot.py` (one snapshot per submit, made before any job).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from launcher import code_snapshot, halving, records, tracking_runs
from launcher.executors import build_executor
from launcher.grid import RunSpec
from launcher.jobs import EvalJob, TrainJob
from launcher.plan import AWAIT, PRUNED, Todo, classify, slots_folder, submitit_folder, to_submit
from launcher.scheduler import SchedulerError, cancel_job, job_is_live, slurm_message
from launcher.sweep_file import Sweep


@dataclass
class Submitted:
    pretrain: list[tuple[RunSpec, Any]] = field(default_factory=list)
    evals: list[tuple[RunSpec, str, Any]] = field(default_factory=list)
    skipped: list[Todo] = field(default_factory=list)
    code: code_snapshot.Snapshot | None = None
    """The code snapshot the jobs import; None when nothing was submitted."""
    deciders: list[tuple[int, Any]] = field(default_factory=list)
    """A halving search's decision jobs (rung index, job): one per rung this submission trains to."""

    def summary(self) -> str:
        ids = sorted({str(j.job_id).split("_")[0] for _, j in self.pretrain})
        lines = [f"submitted {len(self.pretrain)} pretraining job(s) {' '.join(ids)}".rstrip()]
        if self.code is not None and (self.pretrain or self.evals):
            how = "snapshot" if self.code.created else "snapshot reused"
            lines.append(f"code {self.code.code_hash} ({how}: {self.code.path})")
        if self.evals:
            lines.append(
                f"submitted {len(self.evals)} evaluation job(s) ({', '.join(sorted({p for _, p, _ in self.evals}))})"
            )
        for rung, job in self.deciders:
            lines.append(f"submitted the decision of rung {rung} (job {job.job_id})")
        for todo in self.skipped:
            lines.append(f"skipped {todo.run.label}: {' '.join(filter(None, (todo.action, todo.note)))}")
        return "\n".join(lines)


def _record_submission(run: RunSpec, stage: str, job: Any, executor: str) -> None:
    records.add_job(
        run.run_dir, stage, str(job.job_id), executor, str(job.paths.stdout), str(job.paths.stderr)
    )


def submit(
    sweep: Sweep, todos: list[Todo], executor: str, only: str | None = None,
    estimates: dict[str, dict[str, Any]] | None = None,
) -> Submitted:  # fmt: skip
    """One array for the pretraining runs, one per evaluation; evaluations of runs being trained wait
    for their own run (SLURM `aftercorr` on the pretrain array; locally a wait on the run record).
    `estimates` (run id -> launcher.cost.record_fields) go into each (re)trained run's record and
    MLflow tags, for `status` and `report` to show beside the GPU-hours spent."""
    train, eval_only = to_submit(todos, only)
    deciding = _rungs_to_decide(sweep, todos, train)
    out = Submitted(skipped=[t for t in todos if t not in train and t not in eval_only])
    if train or eval_only or deciding:  # once, before any job: every job of this submit imports the same code
        out.code = code_snapshot.snapshot(sweep)
    if only == PRUNED and train:  # on purpose: these runs train on to the end
        halving.revive(sweep, [t.run for t in train])
    before = {t.run.run_dir: records.snapshot(t.run.run_dir) for t in [*train, *eval_only]}
    created: list[str] = []
    try:
        _submit_arrays(sweep, train, eval_only, executor, out, created, estimates or {})
        _submit_deciders(sweep, deciding, executor, out)
    except Exception as err:
        # All or nothing: a refused array leaves no job queued, no record changed, no MLflow run.
        for job in [j for _, j in out.pretrain] + [j for _, _, j in out.evals] + [j for _, j in out.deciders]:
            with contextlib.suppress(Exception):  # the refusal is what the user must see
                cancel_job({"executor": executor, "job_id": str(job.job_id)}, {})
        for run_dir, files in before.items():
            records.restore(run_dir, files)
        tracking_runs.rollback(sweep, created)
        if isinstance(err, SubmitRefused):
            raise SchedulerError(f"{sweep.path}: {err}; nothing was submitted") from None
        raise
    return out


class SubmitRefused(RuntimeError):
    """sbatch (or the local executor) refused an array; the message names the stage and the reason."""


def _submit_array(sweep: Sweep, ex: Any, stage: str, executor: str, jobs: list[Any]) -> list[Any]:
    """Submit `jobs` as one array; SubmitRefused with the scheduler's own message when refused.
    The refusal names the stage's partition, read from the sweep (what the executor was given) rather
    than from submitit's private `ex._executor.parameters`."""
    import submitit

    try:
        with ex.batch():
            return [ex.submit(job) for job in jobs]
    except (submitit.core.utils.FailedJobError, OSError) as err:
        partition = sweep.stage_resources(stage).partition if executor == "slurm" else ""
        where = f" (partition {partition})" if partition else ""
        raise SubmitRefused(
            f"{executor} refused the {stage} array{where}: {slurm_message(str(err))}"
        ) from None


def _submit_arrays(sweep, train, eval_only, executor, out, created, estimates) -> None:
    folder = submitit_folder(sweep)
    code_dir = str(out.code.path) if out.code is not None else ""  # None: nothing to submit
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
                cancel_job(job, records.read_record(todo.run.run_dir))
        records.mark_pending(todo.run.run_dir, estimates.get(todo.run.run_id, {}))
    # One pretraining array per rung this submission trains to (all to the end outside a search).
    to_end: list[tuple[Todo, Any]] = []
    for stop_at in sorted({t.stop_at for t in train}, key=lambda f: f or 2.0):
        group = [t for t in train if t.stop_at == stop_at]
        ex = build_executor(sweep, "pretrain", executor, folder, code_dir)
        jobs = _submit_array(sweep, ex, "pretrain", executor,
                             [TrainJob(_job_config(t), t.run.run_dir, local_slots, slots_folder(sweep))
                              for t in group])  # fmt: skip
        for todo, job in zip(group, jobs, strict=True):
            _record_submission(todo.run, "pretrain", job, executor)
            out.pretrain.append((todo.run, job))
        if not stop_at:
            to_end = list(zip(group, jobs, strict=True))
    for protocol in sweep.evals:
        # Every run (re)trained to its end now needs this evaluation again, on its final checkpoint;
        # keeping the eval array the same size and order as that pretrain array lets SLURM pair task i
        # with task i. A run trained to a search's rung is evaluated once it reaches the end.
        chained = to_end
        alone = [t for t in eval_only if protocol in t.evals]
        overrides = sweep.eval_overrides.get(protocol, [])
        if chained:
            ex = build_executor(sweep, protocol, executor, folder, code_dir)
            if executor == "slurm":
                array_id = str(chained[0][1].job_id).split("_")[0]
                # The stage's own extra sbatch options (what build_executor passed) plus the dependency.
                extra = dict(sweep.stage_resources(protocol).additional, dependency=f"aftercorr:{array_id}")
                ex.update_parameters(slurm_additional_parameters=extra)
            jobs = _submit_array(sweep, ex, protocol, executor,
                                 [EvalJob(protocol, t.run.run_dir, overrides, executor != "slurm", local_slots,
                                          slots_folder(sweep)) for t, _ in chained])  # fmt: skip
            for (todo, _), job in zip(chained, jobs, strict=True):
                _record_submission(todo.run, protocol, job, executor)
                out.evals.append((todo.run, protocol, job))
        if alone:
            ex = build_executor(sweep, protocol, executor, folder, code_dir)
            jobs = _submit_array(sweep, ex, protocol, executor,
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


def wait_search(
    sweep: Sweep, runs: list[RunSpec], submitted: Submitted, console: Any, poll_s: float = 2.0
) -> bool:
    """`sweep run` of a halving search: after the first rung's jobs, wait until no decision job and
    no job of any run is live (the later rungs are submitted by the decision jobs); True when no run
    failed. This process's own decision jobs are asked through submitit (`done()` also reaps a
    local one: a finished child left unreaped would look alive to a pid check forever)."""
    own = {str(job.job_id) for _, job in submitted.deciders}
    with console.status("searching: waiting for the rungs' decisions and the promoted runs"):
        while True:
            state = halving.read_state(sweep)
            jobs = [records.newest_jobs(r.run_dir) for r in runs]
            live = [j for js in jobs for j in js.values() if job_is_live(j)]
            live += [j for j in state["deciders"].values() if j["job_id"] not in own and job_is_live(j)]
            live += [job for _, job in submitted.deciders if not job.done()]
            if not live:
                break
            time.sleep(poll_s)
    return all(records.read_record(r.run_dir).get("state") != records.FAILED for r in runs)


def executor_is_debug(job: Any) -> bool:
    return type(job).__name__ == "DebugJob"


def _result(job: Any) -> None:
    with contextlib.suppress(Exception):  # failures are reported by wait()
        job.result()


def cancel(runs: list[RunSpec]) -> list[str]:
    """Cancel every live job of the runs (SLURM: scancel; local: SIGTERM to the job's processes)."""
    lines = []
    for run in runs:
        for job in records.read_jobs(run.run_dir):
            if not job_is_live(job):
                continue
            cancel_job(job, records.read_record(run.run_dir))
            records.mark_cancelled(run.run_dir)
            lines.append(f"cancelled {run.label} {job['stage']} job {job['job_id']}")
    return lines or ["no live jobs"]


def cancel_deciders(sweep: Sweep) -> list[str]:
    """Cancel a halving search's live decision jobs: a cancelled search must not submit its next rung."""
    lines = []
    for rung, job in halving.read_state(sweep)["deciders"].items():
        if job_is_live(job):
            cancel_job(job, {})
            lines.append(f"cancelled the decision of rung {rung} (job {job['job_id']})")
    return lines


# ---- a halving search's rungs (launcher/halving.py) -------------------------------------------------


def _job_config(todo: Todo) -> dict[str, Any]:
    """The run's job config; trained to a search's rung: stop there, the k-NN monitor at that step."""
    config = todo.run.job_config()
    if todo.stop_at:
        config["train"]["stop_at"] = todo.stop_at
        config["monitor"]["knn_at_end"] = True
    return config


def _rungs_to_decide(sweep: Sweep, todos: list[Todo], train: list[Todo]) -> list[int]:
    """The rungs whose decision this submission queues: those it trains runs to, and those whose
    runs all wait at the rung with no live decision job (a decision job that died)."""
    if not sweep.search.halving:
        return []
    state = halving.read_state(sweep)
    wanted = {t.rung for t in train if t.stop_at} | {t.rung for t in todos if t.action == AWAIT}
    trained = {t.rung for t in train if t.stop_at}
    return sorted(
        k for k in wanted
        if str(k) not in state["rungs"] and (k in trained or not job_is_live(state["deciders"].get(str(k))))
    )  # fmt: skip


def _submit_deciders(sweep: Sweep, rungs: list[int], executor: str, out: Submitted) -> None:
    """One decision job per rung: on SLURM it starts when the rung's array has ended (afterany);
    locally it waits for the rung's runs itself."""
    if not rungs:
        return
    state = halving.read_state(sweep)
    targets = {
        run.run_id: halving.target_rung(run.run_id, state, sweep.search.rungs) for run, _ in out.pretrain
    }
    folder = submitit_folder(sweep)
    code_dir = str(out.code.path) if out.code is not None else ""
    for k in rungs:
        ex = build_executor(sweep, "search", executor, folder, code_dir)
        arrays = {str(job.job_id).split("_")[0] for run, job in out.pretrain if targets.get(run.run_id) == k}
        if executor == "slurm" and arrays:
            extra = dict(
                sweep.stage_resources("search").additional, dependency="afterany:" + ":".join(sorted(arrays))
            )
            ex.update_parameters(slurm_additional_parameters=extra)
        (job,) = _submit_array(sweep, ex, "search", executor, [RungJob(sweep, executor, k)])
        state["deciders"][str(k)] = {"stage": "search", "job_id": str(job.job_id), "executor": executor,
                                     "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}  # fmt: skip
        out.deciders.append((k, job))
    halving.write_state(sweep, state)


@dataclass
class RungJob:
    """A halving search's decision of one rung, then the next rung: waits until none of the rung's
    runs has a live pretraining job (on SLURM the dependency already did), decides it
    (`halving.decide`, once), and submits what follows: the promoted runs to the next rung with its
    own decision job, or to the end with their evaluations. Holds the loaded sweep, so the decision
    uses the sweep as it was submitted."""

    sweep: Sweep
    executor: str
    rung: int
    poll_s: float = 2.0

    def __call__(self) -> dict[str, Any]:
        from launcher import manifest

        runs = manifest.runs(self.sweep)
        state = halving.read_state(self.sweep)
        rungs = self.sweep.search.rungs
        candidates = [r for r in runs if halving.target_rung(r.run_id, state, rungs) == self.rung]
        while any(job_is_live(records.last_job(r.run_dir)) for r in candidates):
            time.sleep(self.poll_s)
        decision = halving.decide(self.sweep, runs, self.rung)
        print(
            f"dinolab: rung {self.rung} ({rungs[self.rung]:.0%}) of {self.sweep.name}: "
            f"{len(decision['promoted'])} run(s) go on, {len(decision['pruned'])} pruned",
            flush=True,
        )
        next_up = submit(self.sweep, classify(self.sweep, runs), self.executor)
        print(next_up.summary(), flush=True)
        return {"rung": self.rung, "promoted": decision["promoted"], "pruned": decision["pruned"]}
