"""The training loop: batches in, steps, a metrics line per window, checkpoints on their cadence.

`train(ctx)` reads as the run goes: open the data, build the run, resume, step until the end, a stop
request or a collapse. What it runs with (config, process group, tracker, logs, the launcher's
callbacks) is one `RunContext`, built by dino/run/train.py. The checkpoint cadence and payload live in
`_Checkpoints`, the metrics window and what it is written to in `_WindowReport`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from dino.config.identity import config_hash
from dino.config.schema import ConfigError, DinoConfig, flatten, to_dict
from dino.data.train_data import TrainData
from dino.eval.monitor import KnnMonitor
from dino.io import distributed, storage
from dino.io.checkpoint import CheckpointWriter
from dino.io.tracking import Tracker
from dino.io.watchdog import Watchdog
from dino.method import rng
from dino.method.collapse import CollapseGuard, CollapseRule
from dino.method.step import train_step
from dino.run.build import Run, build_run
from dino.run.progress import TrainProgress
from dino.run.state import TrainState, restore_latest
from dino.run.train_metrics import MetricsWindow, StepClock

log = logging.getLogger("dino.train")


@dataclass(frozen=True)
class RunContext:
    """What one training process runs with: built once by dino/run/train.py when it holds the run
    folder and its tracker is open, then read by `train()`, `_Checkpoints` and `_WindowReport`."""

    cfg: DinoConfig
    """The resolved config of the run (run.dir, train.*, optim.*, ...)."""
    dist: distributed.DistInfo
    """This process's rank, world size and device (`distributed.setup`); rank 0 alone writes."""
    tracker: Tracker
    """Rank 0's MLflow tracker (a `NullTracker` elsewhere): the params once (`train()`), each window's
    metrics (`_WindowReport`). train.py opens it, tags it and closes it."""
    logs: dict[str, storage.AppendLog]
    """On rank 0, train.log and metrics.jsonl in run.dir (empty elsewhere): `_WindowReport` appends
    each metrics line, `_Checkpoints` publishes remote ones with each checkpoint; train.py closes them."""
    should_stop: Callable[[], bool]
    """The launcher's stop request (preemption, requeue), read by `train()` at each window and agreed
    on by all ranks: when true, a complete checkpoint and `TrainResult.stopped`."""
    on_progress: Callable[[dict[str, float]], None]
    """Called by `train()` on rank 0 after each window (its metrics, total_steps, checkpoint_step):
    the launcher keeps its run record's step, loss and heartbeat current with it."""
    guard: Callable[[], None]
    """Raises when this process no longer holds the run folder (a remote lease taken over):
    `_Checkpoints.save` calls it on rank 0 before each checkpoint, so a process that lost the folder
    never writes into it again."""
    health: Watchdog
    """This rank's progress watchdog (dino/io/watchdog.py): `train()` beats it after every step and
    gives long phases (checkpoint, k-NN monitor, the end) their allowance."""
    hosts: tuple[str, ...] = ()
    """The node of every rank (`hosts[rank]`), gathered once at start: a straggler is named by it."""

    @property
    def device(self) -> torch.device:
        """This rank's device (`dist.device`)."""
        return self.dist.device


@dataclass
class TrainResult:
    run_dir: str
    step: int
    total_steps: int
    stopped: bool = False
    resumed_from: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    collapsed: dict | None = None
    """Set when the collapse guard stopped the run (now, or before: then nothing was trained):
    step, kind, since, entropy, kl, signal, total_steps (dino/method/collapse.py)."""

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def train(ctx: RunContext) -> TrainResult:
    """Train (or continue) the run of `ctx.cfg` in this process; see the module docstring."""
    cfg, device, dist = ctx.cfg, ctx.device, ctx.dist
    log.info(
        "run %s (config %s) on %s, %d process(es)", cfg.run.dir, config_hash(cfg), device, dist.world_size
    )
    data = TrainData.open(cfg, device, dist.world_size)
    log.info("augmentation: %s", data.describe())
    _require_a_batch(cfg, data, dist.world_size)
    # Randomness after initialisation (drop path) gets a per-rank stream, set by _resume.
    run = build_run(cfg, device, data.steps_per_epoch, dist.world_size, ddp=distributed.is_initialized())
    _warn_frozen_last_layer(cfg, run)
    resumed_from = _resume(cfg, run.state, dist)
    start_step = step = run.state.step
    if dist.is_main:
        ctx.tracker.log_params(flatten(to_dict(cfg)))
    checkpoints = _Checkpoints(ctx, run.state)
    report = _WindowReport(ctx, run, data, start_step)
    run.step_state.clock = report.window.clock  # each rank's own time per step, for stragglers
    health = ctx.health
    # Not carried in checkpoints: a resumed run counts its patience again (it can only stop later).
    collapse_guard = _collapse_guard(cfg, data.steps_per_epoch, start_step)
    last: dict[str, float] = {}
    stopped, collapse, total = False, None, run.schedules.total_steps
    try:
        batches = data.batches(start_step, run.end_step, dist.rank, dist.world_size)
        for crops in _timed(batches, report.window.clock, health):
            report.window.add(train_step(run.step_state, crops, step), step)
            step += 1
            health.beat(step)
            final = step >= run.end_step
            due_steps, due_knn = checkpoints.due_steps(step), report.monitor.due(step, final)
            if not (step % cfg.train.log_every == 0 or due_steps or final or due_knn):
                continue
            # Stop requests and the checkpoint clock are read only here, and agreed on by all ranks,
            # so every rank takes the same branch (checkpointing gathers RNG states collectively).
            stop_now, due_time = distributed.any_true(ctx.should_stop(), checkpoints.due_time())
            last = report(step, due_knn, run.state.teacher)  # raises on a non-finite loss, before a save
            if collapse_guard is not None and not final:  # the same window, so the same answer, on every rank
                collapse = collapse_guard.update(step, last["teacher_entropy"], last["kl"])
            if due_steps or due_time or final or stop_now or collapse is not None:
                with health.phase("checkpoint"):
                    checkpoints.save(step, report.window.train_seconds)
            if dist.is_main:
                slowest = (
                    {"slowest_host": ctx.hosts[int(last["slowest_rank"])]} if "slowest_rank" in last else {}
                )
                ctx.on_progress(
                    {**last, **slowest, "total_steps": total, "checkpoint_step": checkpoints.newest()}
                )
            if collapse is not None:
                break
            if stop_now and not final:
                stopped = True
                log.info("stop requested: checkpoint written at step %d", step)
                break
    finally:
        report.close()
        with health.phase("checkpoint"):
            checkpoints.wait()  # whatever happened, the save in flight ends before the process may exit
    report.warn_skipped(last)
    with health.phase("end"):
        checkpoints.close()  # raises if the newest checkpoint could not be written
        # Rank 0 alone writes checkpoints; the others return only once it is complete (a job that
        # ends or is requeued then never leaves a rank ahead of the newest checkpoint).
        distributed.barrier()
    if step >= total and start_step == step:
        log.info("run already finished at step %d", step)
    collapsed = None if collapse is None else {**collapse.to_dict(), "total_steps": total}
    return TrainResult(cfg.run.dir, step, total, stopped, resumed_from, last, collapsed)


def _timed(batches: Iterable, clock: StepClock, health: Watchdog) -> Iterator:
    """The batches, with the time this rank waits for each (its own time, for stragglers) and the
    watchdog told whether the rank waits for data (outside any collective) or steps."""
    it = iter(batches)
    while True:
        health.waiting("data")
        waited_from = time.perf_counter()
        try:
            crops = next(it)
        except StopIteration:
            return
        clock.waited(time.perf_counter() - waited_from)
        health.waiting("step")
        yield crops


def _require_a_batch(cfg: DinoConfig, data: TrainData, world_size: int) -> None:
    if data.steps_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {len(data.dataset)} images, fewer than one global batch "
            f"(optim.batch_size={cfg.optim.batch_size} x {world_size} process(es))"
        )


def _warn_frozen_last_layer(cfg: DinoConfig, run: Run) -> None:
    if run.schedules.freeze_last_layer_steps >= run.end_step:
        log.warning(
            "optim.freeze_last_layer=%s epoch(s) spans the whole run (%d steps): the head's last layer "
            "never trains; use optim.freeze_last_layer=0 for runs this short",
            cfg.optim.freeze_last_layer, run.end_step,
        )  # fmt: skip


def _resume(cfg: DinoConfig, state: TrainState, dist: distributed.DistInfo) -> int | None:
    """Load the newest complete checkpoint (the step it was taken at; None: a fresh run) and set this
    rank's RNG: the saved stream, or train.seed + rank."""
    latest = restore_latest(cfg, state)
    # Every rank reads the checkpoint itself: on a node-local run.dir the others would silently
    # start over while rank 0 resumes.
    found = distributed.all_gather_object(state.step)
    if len(set(found)) > 1:
        raise ConfigError(
            f"the ranks see different checkpoints in run.dir={cfg.run.dir} (newest step by rank: {found}): "
            "run.dir must be one folder shared by every node (a shared file system or s3://), not a node-local path"
        )
    if latest is None:
        torch.manual_seed(cfg.train.seed + dist.rank)
        return None
    rng.restore(state.rng[min(dist.rank, len(state.rng) - 1)])
    return latest.step


def _collapse_guard(cfg: DinoConfig, steps_per_epoch: int, start_step: int) -> CollapseGuard | None:
    if not cfg.train.collapse_stop:
        return None
    warmups = (cfg.optim.warmup_epochs, cfg.teacher.warmup_temp_epochs)
    return CollapseGuard(
        CollapseRule.from_config(cfg.train, cfg.head.out_dim, warmups, steps_per_epoch), start_step
    )


class _Checkpoints:
    """When the loop checkpoints (every train.checkpoint_every_steps steps or _minutes, and whenever
    it stops) and the save itself: `TrainState` on rank 0, written in the background."""

    def __init__(self, ctx: RunContext, state: TrainState) -> None:
        self.ctx, self.cfg, self.state = ctx, ctx.cfg, state
        self.start_step = state.step  # made after the resume: the step this process started from
        self.writer = CheckpointWriter(self.cfg.run.dir, config_hash(self.cfg), self.cfg.train.keep_last)
        self.last_time = time.monotonic()

    def due_steps(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and step % every == 0

    def due_time(self) -> bool:
        minutes = self.cfg.train.checkpoint_every_minutes
        return bool(minutes) and time.monotonic() - self.last_time >= 60 * minutes

    def newest(self) -> int:
        """The newest complete checkpoint of this run (its start step before the first), for progress."""
        return self.start_step if self.writer.last_complete is None else self.writer.last_complete

    def save(self, step: int, train_seconds: float) -> None:
        """Collective: every rank's RNG state goes into rank 0's checkpoint."""
        self.state.step, self.state.train_seconds = step, train_seconds
        self.state.rng = distributed.all_gather_object(rng.capture())
        if self.ctx.dist.is_main:
            self.ctx.guard()
            # A remote run folder gets its logs published with each checkpoint (object stores cannot append).
            remote = [run_log for run_log in self.ctx.logs.values() if run_log.remote]
            self.writer.save(step, self.state.state_dict(), remote)
        self.last_time = time.monotonic()

    def wait(self) -> None:
        self.writer.wait()

    def close(self) -> None:
        self.writer.close()


class _WindowReport:
    """Every metrics window: the k-NN monitor when due, skipped images, the reduced metrics line into
    metrics.jsonl, the tracker and the progress bar."""

    def __init__(self, ctx: RunContext, run: Run, data: TrainData, start_step: int) -> None:
        cfg, dist, spe = ctx.cfg, ctx.dist, data.steps_per_epoch
        self.ctx, self.bad = ctx, data.bad
        self.window = MetricsWindow(ctx.device, run.schedules, spe, cfg.optim.batch_size, dist.world_size,
                                    run.end_step, cfg.run.dir, run.state.train_seconds)  # fmt: skip
        self.progress = TrainProgress(start_step, run.end_step, spe, cfg.train.progress and dist.is_main)
        self.monitor = KnnMonitor(cfg, spe, ctx.device)

    def __call__(self, step: int, due_knn: bool, teacher: torch.nn.Module) -> dict[str, float]:
        extra: dict[str, float] = {}
        if due_knn:
            with self.ctx.health.phase("monitor"):
                result = self.monitor(teacher.backbone, step)
            extra = result.metrics()
            self.window.pause(result.seconds)
        if self.bad is not None:  # by this process's loader since it started, summed over ranks
            extra["skipped_images"] = distributed.sum_across(torch.tensor(float(self.bad.count))).item()
        last = self.window.reduce(step, extra)  # raises on a non-finite loss
        if self.ctx.dist.is_main:
            self.ctx.logs["metrics.jsonl"].append(json.dumps(last) + "\n")
            self.ctx.logs["train.log"].check()  # a log line the disk refused stops the run like a metric
            self.ctx.tracker.log_metrics({k: v for k, v in last.items() if k != "step"}, step)
        self.progress.update(step, last)
        return last

    def warn_skipped(self, last: dict[str, float]) -> None:
        if self.bad is not None and last.get("skipped_images"):
            log.warning(
                "%d unreadable image(s) were skipped and replaced by the next readable one; the warnings "
                "above name them", last["skipped_images"],
            )  # fmt: skip

    def close(self) -> None:
        self.progress.close()
