"""DINO pretraining: `run(cfg)` sets up (run-folder lock, config.yaml, logs, tracking), runs the loop
of dino/run/loop.py (which resumes from the newest complete checkpoint) and closes.

Resume belongs here: started again in the same run.dir, a run continues exactly (same weights as an
uninterrupted run) from its newest complete checkpoint. Requeueing belongs to the launcher, which only
needs `run(cfg, should_stop=...)`: when `should_stop()` turns true the loop finishes the current step,
writes a complete checkpoint and returns with `stopped=True`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import yaml

from dino.config.identity import code_hash, config_hash, semantic_diff
from dino.config.schema import DinoConfig, to_dict
from dino.io import checkpoint, distributed, run_lock, storage
from dino.io.mlflow_tracker import build_tracker
from dino.io.watchdog import Hang, Watchdog, health_dir, node_name
from dino.method.collapse import MARKER
from dino.run import repro
from dino.run.accelerators import device_card
from dino.run.loop import RunContext, TrainResult, train
from dino.run.progress import setup_logging
from dino.run.state import ConfigMismatchError

log = logging.getLogger("dino.train")


def _read_collapse(run_dir: str) -> dict | None:
    """The collapse guard's decision saved in run.dir (None: the run has not collapsed)."""
    path = storage.join(run_dir, MARKER)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        return None


def _prepare_run_dir(cfg: DinoConfig, is_main: bool) -> None:
    """Create run.dir and its config.yaml; refuse a run.dir that holds another config's run."""
    path = storage.join(cfg.run.dir, "config.yaml")
    if storage.exists(path):
        saved = yaml.safe_load(storage.read_text(path))
        diff = semantic_diff(saved, cfg)
        if diff:
            raise ConfigMismatchError(
                f"{cfg.run.dir} holds a run with another config; differing keys: {'; '.join(diff)}. "
                "Use another run.dir, or the same settings to resume it."
            )
    if is_main:
        storage.makedirs(cfg.run.dir)
        storage.atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run(
    cfg: DinoConfig,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[], None] | None = None,
    on_hang: Callable[[Hang], None] | None = None,
) -> TrainResult:
    """Train (or continue training) the run described by `cfg`; see the module docstring.

    `on_start()` is called on rank 0 once this process holds the run folder (dino/io/run_lock.py) and
    before it writes anything; `on_progress(metrics)` on rank 0 after every metric reduction and
    checkpoint (the launcher keeps its run record's step, loss and heartbeat current with them).
    A write the disk refuses stops the run with `storage.WriteError` naming the file and the
    checkpoint the same command resumes from. A rank that makes no progress for
    `train.hang_timeout_s` ends the process with `HUNG_EXIT_CODE` after `on_hang(hang)` ran on the
    lowest live rank (dino/io/watchdog.py).
    """
    try:
        return _run(cfg, should_stop, on_progress, on_start, on_hang)
    except storage.WriteError as err:  # a full disk: what failed, and where the run resumes from
        raise storage.WriteError(f"{err}. {_resume_point(cfg.run.dir)}") from None


def _run(
    cfg: DinoConfig,
    should_stop: Callable[[], bool] | None,
    on_progress: Callable[[dict[str, float]], None] | None,
    on_start: Callable[[], None] | None,
    on_hang: Callable[[Hang], None] | None,
) -> TrainResult:
    """Set up in order (process group, run-folder lock, logs, watchdog, config.yaml, collapse marker,
    tracker), train with the one `RunContext` they make, and release them whatever happens."""
    # The rank's device, then its process group (its timeout follows train.hang_timeout_s).
    trace_dir = "" if storage.is_remote(cfg.run.dir) else health_dir(cfg.run.dir)
    dist = distributed.setup(cfg.train.device, cfg.train.hang_timeout_s, trace_dir)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    should_stop = should_stop or (lambda: False)
    logs: dict[str, storage.AppendLog] = {}
    lock = _lock_run_dir(cfg, dist, should_stop)  # before any write: one writer
    health = Watchdog(cfg.run.dir, dist.rank, dist.world_size, cfg.train.hang_timeout_s, on_hang=on_hang)
    try:
        if dist.is_main:
            if on_start is not None:
                on_start()
            logs = {
                name: storage.AppendLog(storage.join(cfg.run.dir, name))
                for name in ("train.log", "metrics.jsonl")
            }
        setup_logging(logs.get("train.log"))
        hosts = tuple(distributed.all_gather_object(node_name()))
        health.start()  # after the lock: heartbeat files of a refused job would overwrite the holder's
        _prepare_run_dir(cfg, dist.is_main)  # before tracking: a folder of another config is refused
        stopped_before = _collapsed_before(cfg, dist)
        if stopped_before is not None:
            return stopped_before
        guard = lock.check if lock is not None else (lambda: None)
        tracker = build_tracker(cfg, dist.is_main)  # closed by _tracked, whatever happens there
        ctx = RunContext(cfg, dist, tracker, logs, should_stop, on_progress or (lambda m: None), guard,
                         health, hosts)  # fmt: skip
        return _tracked(ctx)
    finally:
        health.stop()
        distributed.destroy()
        setup_logging(None)  # release the log file before it is published
        for run_log in logs.values():
            try:
                run_log.close()
            except storage.StorageError as err:
                log.error("%s", err)
        if lock is not None:
            lock.release()


def _collapsed_before(cfg: DinoConfig, dist: distributed.DistInfo) -> TrainResult | None:
    """A run the collapse guard stopped: with train.collapse_stop still on it stays stopped (the
    result says so, nothing is trained); turned off, the decision is dropped and the run trains on."""
    found = _read_collapse(cfg.run.dir)
    if found is None:
        return None
    if cfg.train.collapse_stop:
        log.warning(
            "run %s collapsed at step %d (%s); not training on. To continue it anyway: the same "
            "command with train.collapse_stop=false", cfg.run.dir, found["step"], found.get("signal", ""),
        )  # fmt: skip
        return TrainResult(cfg.run.dir, found["step"], found["total_steps"], collapsed=found)
    distributed.barrier()  # every rank has read the marker before rank 0 removes it
    if dist.is_main:
        storage.remove(storage.join(cfg.run.dir, MARKER))
    log.info("train.collapse_stop=false: training on past the collapse at step %d", found["step"])
    return None


def _resume_point(run_dir: str) -> str:
    """Where the same command resumes, for an error that stops the run."""
    try:
        steps = checkpoint.complete_steps(run_dir)
    except Exception:  # noqa: BLE001 - only for a message
        steps = []
    if not steps:
        return "There is no complete checkpoint yet; the same command starts the run again once it can write."
    return (
        f"The newest complete checkpoint is step {steps[-1]} ({checkpoint.checkpoint_path(run_dir, steps[-1])}); "
        "free space and run the same command again to resume from it."
    )


def _lock_run_dir(
    cfg: DinoConfig, dist: distributed.DistInfo, give_up: Callable[[], bool]
) -> run_lock.RunLock | None:
    """Rank 0 takes the run folder's lock (the others share it); when it is held elsewhere every
    rank raises RunLocked naming the holder. `train.wait_for_lock`, or a holder that is an earlier
    allocation of this same SLURM job (a requeue overlapping it), waits instead."""
    lock, refusal, failure = None, "", None
    if dist.is_main:
        lock = run_lock.RunLock(cfg.run.dir)
        wait = True if cfg.train.wait_for_lock else run_lock.same_slurm_job

        def waiting(holder: str) -> None:
            print(
                f"dinolab train: {cfg.run.dir} is being trained by {holder}; waiting for it",
                file=sys.stderr,
                flush=True,
            )

        try:
            storage.makedirs(cfg.run.dir)  # an object store: checks the bucket exists
            lock.acquire(wait=wait, on_wait=waiting, give_up=give_up)
        except run_lock.RunLocked as err:
            refusal = str(err)
        except BaseException as err:
            failure = err
            refusal = f"rank 0 could not start: {err}"
    # Rank 0's outcome on every rank: none of them waits forever in a collective rank 0 never joins.
    refusal = distributed.all_gather_object(refusal)[0]
    if refusal:
        distributed.destroy()
        if failure is not None:
            raise failure
        if refusal.startswith("rank 0 could not start"):
            raise RuntimeError(refusal)
        raise run_lock.RunLocked(refusal)
    return lock


def _tracked(ctx: RunContext) -> TrainResult:
    """Train with the tracker open; its MLflow run ends FINISHED, KILLED (stopped to be requeued)
    or FAILED."""
    cfg, tracker = ctx.cfg, ctx.tracker
    status = "FAILED"
    try:
        # The card is a throughput-shaping key: `sweep plan` uses this run's img/s for runs of the
        # same shape on the same card (launcher/cost/speeds.py).
        # The code hash: the report flags a table whose runs trained with different code.
        tracker.set_tags({"dinolab.config_hash": config_hash(cfg), "dinolab.card": device_card(ctx.device),
                          "dinolab.code_hash": code_hash()})  # fmt: skip
        tracker.log_artifact(storage.join(cfg.run.dir, "config.yaml"))
        if ctx.dist.is_main:  # what this start ran with and where (docs/reproducibility.md), each start
            tracker.log_artifact(
                repro.write_record(cfg.run.dir, repro.build_record(cfg, list(ctx.hosts), code_hash()))
            )
        result = train(ctx)
        if result.collapsed is not None:
            _record_collapse(ctx, result.collapsed, result.last_metrics)
        # A collapsed run ends FINISHED (it will not be resumed, its reports show its last metrics)
        # with the tag dinolab.state=collapsed; KILLED is a run stopped to be requeued.
        done = result.finished or result.collapsed is not None
        status = "FINISHED" if done else "KILLED"
        if not done and not result.stopped:  # at train.stop_at (a search's rung) or max_steps: not preempted
            tracker.set_tags({"dinolab.state": "paused"})
        elif result.finished and cfg.train.stop_at == 0:
            tracker.set_tags({"dinolab.state": "finished"})  # a run paused before: no longer
        if done and ctx.logs:
            tracker.log_artifact(ctx.logs["metrics.jsonl"].local_path, "")
        return result
    finally:
        try:
            tracker.close(status)
        except storage.StorageError as err:
            if status != "FAILED":
                raise
            # The run already failed (an outage cut a checkpoint): that error is the one to show,
            # not the tracker's failure to reach the same store while closing.
            log.error("%s", err)


def _record_collapse(ctx: RunContext, collapsed: dict, last: dict[str, float]) -> None:
    """After the final checkpoint is complete: the decision in run.dir (a restart reads it), on the
    MLflow run, and one WARNING line."""
    if ctx.dist.is_main:
        collapsed["gpu_hours"] = last.get("gpu_hours", 0.0)
        storage.atomic_write_text(storage.join(ctx.cfg.run.dir, MARKER), json.dumps(collapsed, indent=1))
        ctx.tracker.set_tags({"dinolab.state": "collapsed", "dinolab.collapse_step": str(collapsed["step"]),
                              "dinolab.collapse_signal": collapsed["signal"],
                              "dinolab.total_steps": str(collapsed["total_steps"])})  # fmt: skip
    log.warning(
        "teacher output collapsed (%s): run stopped at step %d of %d with a final checkpoint; "
        "train.collapse_stop=false trains it on", collapsed["signal"], collapsed["step"], collapsed["total_steps"],
    )  # fmt: skip
    distributed.barrier()  # no rank exits before the marker exists
