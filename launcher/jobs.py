"""The jobs submitit runs: pretraining and evaluation, both `Checkpointable`.

On USR2 (preemption, or a time limit coming) submitit calls `checkpoint()` in the main thread. The
training itself runs in a worker thread, so `checkpoint()` can ask it to stop at the next metric
boundary, wait for the complete checkpoint, record the requeue and hand back a fresh job with the
same spec; submitit then requeues it. Resume is the train loop's own: the new job continues from the
newest complete checkpoint, at the exact step.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import submitit

from launcher import records

MAX_HANG_REQUEUES = 3
"""Requeues of a run after a hang (not counted as timeouts); the next hang leaves it `hung`."""
STRAGGLER_RATIO = 1.5
"""A rank whose own time per step is this many times the others' median is slow (a straggler)."""


def _job_env() -> tuple[str, int, int]:
    """(job id, global rank, number of tasks) of this process; one local task outside submitit."""
    try:
        env = submitit.JobEnvironment()
        return str(env.job_id), env.global_rank, env.num_tasks
    except RuntimeError:
        return "", 0, 1


def _cluster() -> str:
    """`slurm`, `local` or `debug`: where this job runs (`""` outside submitit)."""
    try:
        return submitit.JobEnvironment().cluster
    except RuntimeError:
        return ""


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    """scontrol, immune to the SIGTERM SLURM sends the job's processes once it is requeued (an
    ignored signal stays ignored across exec): the update after the requeue still gets through."""
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30,
                          preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))  # fmt: skip


def _excluded_nodes(job_id: str) -> list[str]:
    """The job's own --exclude (the sweep's `exclude:`), kept when a hung node is added to it."""
    shown = _scontrol("show", "job", job_id).stdout
    for field_ in shown.split():
        if field_.startswith("ExcNodeList=") and field_ != "ExcNodeList=(null)":
            expanded = _scontrol("show", "hostnames", field_.split("=", 1)[1]).stdout.split()
            return expanded
    return []


def requeue_without(job_id: str, nodes: list[str]) -> str:
    """Requeue this SLURM job and keep it off `nodes` (`ExcNodeList`, which SLURM only changes on a
    pending job: set right after the requeue, while the job's nodes are still releasing it, so the
    scheduler cannot place it there first). Returns the nodes now excluded; raises on failure."""
    excluded = sorted(set(_excluded_nodes(job_id)) | set(nodes))
    done = _scontrol("requeue", job_id)
    if done.returncode:
        raise RuntimeError(f"scontrol requeue {job_id}: {done.stderr.strip()}")
    for _ in range(20):
        done = _scontrol("update", f"JobId={job_id}", f"ExcNodeList={','.join(excluded)}")
        if done.returncode == 0:
            return ",".join(excluded)
        time.sleep(0.5)
    raise RuntimeError(
        f"scontrol update JobId={job_id} ExcNodeList={','.join(excluded)}: {done.stderr.strip()}"
    )


def _on_hang(run_dir: str, job_id: str, protocol: str = "") -> Any:
    """The launcher's part when the watchdog stops a job (on the lowest live rank, before the exit):
    the run's record (an evaluation's own record, for `protocol`) says `hung`, which rank and node
    stopped, and on SLURM the job is requeued without that node, at most MAX_HANG_REQUEUES times."""

    def hung(hang: Any) -> None:
        prior = records.read_eval_record(run_dir, protocol) if protocol else records.read_record(run_dir)
        if prior.get("state") == records.HUNG:
            # Recorded (and requeued) already by another rank of this allocation: the next allocation
            # sets `running` first. (The frozen rank itself, continued by SLURM's kill, must not report.)
            return
        hangs = prior.get("hangs", 0) + 1
        fields = {"state": records.HUNG, "hangs": hangs, "hang_rank": hang.rank, "hang_host": hang.host,
                  "hang_step": hang.step, "hang_frozen": hang.frozen, "hang_at": hang.detected_at,
                  "error": hang.message()}  # fmt: skip
        requeue = _cluster() == "slurm" and hangs <= MAX_HANG_REQUEUES
        if requeue:
            try:
                fields["excluded_nodes"] = requeue_without(job_id, [hang.host])
                fields["error"] += f"; requeued without {hang.host} ({hangs}/{MAX_HANG_REQUEUES})"
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
                fields["error"] += f"; not requeued: {err}"
        elif _cluster() == "slurm":
            fields["error"] += (
                f"; not requeued: {hangs - 1} hang requeue(s) already (at most {MAX_HANG_REQUEUES})"
            )
        if protocol:
            records.set_eval_state(run_dir, protocol, records.HUNG, fields.pop("error"), **fields)
        else:
            records.update_record(run_dir, **fields)
        print(f"dinolab: {run_dir}: {hang.message()}", file=sys.stderr, flush=True)

    return hung


def _export_distributed_env(num_tasks: int) -> None:
    """RANK/WORLD_SIZE/MASTER_ADDR/... from the SLURM or local job, for torch.distributed."""
    if num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@dataclass
class TrainJob(submitit.helpers.Checkpointable):
    """Pretrain one run. Holds only its spec (pickled by submitit); thread and stop flag live in the job."""

    config: dict[str, Any]
    """The run's config as the planner composed it (`RunSpec.job_config`): a plain dict, small to
    pickle; values that read the node's environment (`${oc.env:RANK}`) are expressions resolved here."""
    run_dir: str
    """The run's folder, where its record is written (the config's run.dir)."""
    local_slots: int = 0
    """The local executor's parallelism (`_acquire_slot`); 0 under SLURM."""
    slots_dir: str = ""
    _stop: threading.Event | None = field(default=None, init=False, repr=False, compare=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False, compare=False)
    _started: bool = field(default=False, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_thread", "_started")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if (
            "config" not in state
        ):  # queued by a dinolab whose jobs composed their own config: a requeue across an upgrade
            from dino.config.compose import compose
            from dino.config.schema import to_dict

            state = {**state, "config": to_dict(compose(state.pop("overrides")))}
        self.__dict__.update(state, _stop=None, _thread=None, _started=False)

    def __call__(self) -> dict[str, Any]:
        from dino.config.compose import from_job_dict
        from dino.config.identity import code_hash
        from dino.run.train import run

        job_id, rank, num_tasks = _job_env()
        _export_distributed_env(num_tasks)
        slot = None
        if self.local_slots and num_tasks == 1:
            slot = _acquire_slot(self.slots_dir, self.local_slots)
        cfg = from_job_dict(self.config)
        main = rank == 0

        def started() -> None:  # once this job holds the run folder: a refused job leaves the record
            self._started = True
            prior = records.read_record(self.run_dir)
            records.update_record(self.run_dir, state=records.RUNNING, job_id=job_id, error="", pid=os.getpid(),
                                  requeues=prior.get("requeues", 0), started=time.time(),
                                  code_hash=code_hash())  # fmt: skip

        slow: dict[str, Any] = {}  # the straggler count of the previous window (this job's)

        def report(metrics: dict[str, float]) -> None:
            slow.update(_straggler(slow.get("straggler"), metrics))
            records.update_record(
                self.run_dir, state=records.RUNNING, step=int(metrics["step"]), total_steps=int(metrics["total_steps"]),
                loss=metrics["loss"], teacher_entropy=metrics["teacher_entropy"], img_per_s=metrics["img_per_s"],
                checkpoint_step=int(metrics["checkpoint_step"]), gpu_hours=metrics.get("gpu_hours"),
                **slow,
            )  # fmt: skip

        outcome: dict[str, Any] = {}
        self._stop = threading.Event()

        def work() -> None:
            try:
                outcome["result"] = run(
                    cfg, should_stop=self._stop.is_set, on_progress=report if main else None,
                    on_start=started if main else None, on_hang=_on_hang(self.run_dir, job_id),
                )  # fmt: skip
            except BaseException as err:  # noqa: BLE001 - reported below, in the main thread
                outcome["error"] = err
                outcome["traceback"] = traceback.format_exc()

        self._thread = threading.Thread(target=work, name="dino-train", daemon=True)
        self._thread.start()
        while self._thread.is_alive():
            self._thread.join(0.5)  # short joins: signals are handled in the main thread between them
        if slot is not None:
            slot.close()
        if "error" in outcome:
            from dino.io.run_lock import RunLocked

            # Refused because another process trains the run: its record is the holder's, not ours.
            if main and not isinstance(outcome["error"], RunLocked):
                records.update_record(self.run_dir, state=records.FAILED, error=outcome["traceback"][-2000:])
            raise outcome["error"]
        result = outcome["result"]
        if main and result.collapsed is not None:  # stopped by the collapse guard: done, not failed
            c = result.collapsed
            records.update_record(self.run_dir, state=records.COLLAPSED, step=c["step"], total_steps=c["total_steps"],
                                  checkpoint_step=c["step"], collapse_step=c["step"], collapse_signal=c["signal"],
                                  gpu_hours=c.get("gpu_hours"), finished=time.time())  # fmt: skip
        elif main and result.finished:
            records.update_record(self.run_dir, state=records.COMPLETED, step=result.step, total_steps=result.total_steps,
                                  finished=time.time())  # fmt: skip
        elif main and not result.stopped:  # at train.stop_at (a search's rung) or train.max_steps
            self._record_pause(cfg, result)
        return {"run_dir": self.run_dir, "step": result.step, "finished": result.finished}

    def _record_pause(self, cfg: Any, result: Any) -> None:
        """`paused` at this step, and for a rung (train.stop_at) the metrics of its last window (the
        k-NN monitor's among them) under `rungs`: what the search decides on. A job that found the
        rung reached already (a resubmit) keeps what the first one recorded."""
        fields: dict[str, Any] = {"state": records.PAUSED, "step": result.step, "total_steps": result.total_steps,
                                  "checkpoint_step": result.step}  # fmt: skip
        if cfg.train.stop_at and result.last_metrics:
            from launcher.halving import fraction_key

            rungs = dict(records.read_record(self.run_dir).get("rungs") or {})
            last = result.last_metrics
            rungs[fraction_key(cfg.train.stop_at)] = {
                "step": result.step, "gpu_hours": last.get("gpu_hours"),
                "metrics": {k: v for k, v in last.items() if isinstance(v, int | float)},
            }  # fmt: skip
            fields["rungs"] = rungs
        records.update_record(self.run_dir, **fields)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """USR2: stop at the next boundary with a complete checkpoint, then requeue a fresh job."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = records.read_record(self.run_dir)
        if self._started and record.get("state") not in records.DONE:  # not a job still waiting for the lock
            records.update_record(self.run_dir, state=records.REQUEUED, requeues=record.get("requeues", 0) + 1,
                                  requeued_at_step=record.get("step", 0))  # fmt: skip
        print(f"dinolab: requeueing {self.run_dir} at step {record.get('step')}", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))  # a fresh job, same spec


def _straggler(previous: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """The record's `straggler`: the slowest rank of the window, its node, its time over the others'
    median, and for how many windows in a row some rank has been over STRAGGLER_RATIO (`sweep status`
    flags a run once that is sustained). Nothing for a single-process run."""
    if "straggler_ratio" not in metrics:
        return {}
    ratio, rank = metrics["straggler_ratio"], int(metrics["slowest_rank"])
    slow = ratio > STRAGGLER_RATIO
    windows = (previous or {}).get("windows", 0) + 1 if slow else 0
    return {"straggler": {"rank": rank, "host": metrics.get("slowest_host", ""), "ratio": round(ratio, 2),
                          "windows": windows, "step": int(metrics["step"])}}  # fmt: skip


@dataclass
class EvalJob(submitit.helpers.Checkpointable):
    """The `protocol` evaluation (`run_knn`, `run_linear`) of a run's newest checkpoint, after its
    pretraining completed.

    On SLURM the dependency (aftercorr) orders it; on the local executor it waits for the run record
    to say completed. Evaluations keep their own resumable state, so a requeue just starts again.
    """

    protocol: str
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    wait_for_pretrain: bool = False
    local_slots: int = 0
    slots_dir: str = ""
    poll_s: float = 2.0

    def __call__(self) -> dict[str, Any]:
        _, rank, num_tasks = _job_env()
        # A stage of several tasks is one data-parallel evaluation (each rank its share of the
        # feature shards and of every probe batch), not that many copies of the same work.
        _export_distributed_env(num_tasks)
        main = rank == 0
        state = records.read_record(self.run_dir).get("state")
        while self.wait_for_pretrain and state not in records.DONE:
            if state in (records.FAILED, records.CANCELLED):
                raise RuntimeError(
                    f"pretraining of {self.run_dir} {state}; {self.protocol} evaluation not run"
                )
            time.sleep(self.poll_s)
            state = records.read_record(self.run_dir).get("state")
        if state == records.COLLAPSED:  # SLURM's afterok/aftercorr starts us too: the run exited 0
            return self._skip_collapsed()
        slot = None
        if self.local_slots and num_tasks == 1:
            slot = _acquire_slot(self.slots_dir, self.local_slots)
        if main:
            self._set_eval_state("running")
        try:
            self._evaluate()
        except BaseException:
            if main:
                self._set_eval_state("failed")
            raise
        finally:
            if slot is not None:
                slot.close()
        if main:
            self._set_eval_state("completed")
        return {"run_dir": self.run_dir, "protocol": self.protocol}

    def _evaluate(self) -> None:
        """The protocol on the run's newest checkpoint; it logs its own result to MLflow."""
        from dino.eval.results import KNN
        from dino.run.progress import setup_logging

        setup_logging()  # progress and resume messages in the job's stderr
        overrides = [f"run.dir={self.run_dir}", *self.overrides]
        on_hang = _on_hang(self.run_dir, _job_env()[0], self.protocol)
        if self.protocol == KNN:
            from dino.eval.knn import run_knn

            run_knn(overrides, on_hang=on_hang)
        else:
            from dino.eval.linear import run_linear

            run_linear(overrides, on_hang=on_hang)

    def _set_eval_state(self, state: str, reason: str = "") -> None:
        records.set_eval_state(self.run_dir, self.protocol, state, reason)

    def _skip_collapsed(self) -> dict[str, Any]:
        """A collapsed teacher stopped learning (the paper's collapsed rows score 0.1 %): evaluating it
        would spend a job on a known answer."""
        record = records.read_record(self.run_dir)
        reason = f"pretraining collapsed at step {record.get('collapse_step')}: {record.get('collapse_signal', '')}"
        if _job_env()[1] == 0:
            self._set_eval_state(records.SKIPPED, reason)
        print(
            f"dinolab: {self.protocol} evaluation of {self.run_dir} skipped: {reason}",
            file=sys.stderr,
            flush=True,
        )
        return {"run_dir": self.run_dir, "protocol": self.protocol, "skipped": reason}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))


def _acquire_slot(folder: str, slots: int, poll_s: float = 0.5) -> IO:
    """Array parallelism for submitit's local executor, which starts every job at once: block until
    one of `slots` slot files under `folder` is free (a non-blocking `flock`), and keep the returned
    file open to hold it. The kernel drops the lock when the process ends, however it ends, so a
    killed job never leaves a slot taken."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            handle = open(os.path.join(folder, f"slot-{i}.lock"), "w")  # noqa: SIM115 - held open on purpose
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
        time.sleep(poll_s)
