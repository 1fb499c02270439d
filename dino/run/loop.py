"""The training loop: batches in, steps, a metrics line per window, checkpoints on their cadence.

`train()` reads as the run goes: open the data, build the run, resume, step until the end, a stop
request or a collapse. The checkpoint cadence and payload live in `Checkpoints`, the metrics window
and what it is written to in `WindowReport`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dino.config.identity import config_hash
from dino.config.schema import ConfigError, DinoConfig, flatten, to_dict
from dino.data.train_data import TrainData
from dino.eval.monitor import KnnMonitor
from dino.io import distributed, storage
from dino.io.checkpoint_writer import CheckpointWriter
from dino.method import rng
from dino.method.collapse import CollapseGuard, CollapseRule
from dino.method.step import train_step
from dino.run.build import Run, build_run
from dino.run.progress import TrainProgress
from dino.run.state import TrainState, restore_latest
from dino.run.train_metrics import MetricsWindow

log = logging.getLogger("dino.train")


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


def train(cfg, device, dist, tracker, logs, should_stop, on_progress, guard) -> TrainResult:
    """`guard()` raises when this process no longer holds the run folder (a remote lease taken over):
    called before each checkpoint, so a process that lost the folder never writes into it again."""
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
        tracker.log_params(flatten(to_dict(cfg)))
    checkpoints = Checkpoints(cfg, dist, run.state, logs, guard)
    report = WindowReport(cfg, device, dist, run, data, tracker, logs, start_step)
    # Not carried in checkpoints: a resumed run counts its patience again (it can only stop later).
    collapse_guard = _collapse_guard(cfg, data.steps_per_epoch, start_step)
    last: dict[str, float] = {}
    stopped, collapse, total = False, None, run.schedules.total_steps
    try:
        for crops in data.batches(start_step, run.end_step, dist.rank, dist.world_size):
            report.window.add(train_step(run.step_state, crops, step), step)
            step += 1
            final = step >= run.end_step
            due_steps, due_knn = checkpoints.due_steps(step), report.monitor.due(step, final)
            if not (step % cfg.train.log_every == 0 or due_steps or final or due_knn):
                continue
            # Stop requests and the checkpoint clock are read only here, and agreed on by all ranks,
            # so every rank takes the same branch (checkpointing gathers RNG states collectively).
            stop_now, due_time = distributed.any_true(should_stop(), checkpoints.due_time())
            last = report(step, due_knn, run.state.teacher)  # raises on a non-finite loss, before a save
            if collapse_guard is not None and not final:  # the same window, so the same answer, on every rank
                collapse = collapse_guard.update(step, last["teacher_entropy"], last["kl"])
            if due_steps or due_time or final or stop_now or collapse is not None:
                checkpoints.save(step, report.window.train_seconds)
            if dist.is_main:
                on_progress({**last, "total_steps": total, "checkpoint_step": checkpoints.newest(start_step)})
            if collapse is not None:
                break
            if stop_now and not final:
                stopped = True
                log.info("stop requested: checkpoint written at step %d", step)
                break
    finally:
        report.close()
        checkpoints.wait()  # whatever happened, the save in flight ends before the process may exit
    report.warn_skipped(last)
    checkpoints.close()  # raises if the newest checkpoint could not be written
    # Rank 0 alone writes checkpoints; the others return only once it is complete (a job that ends
    # or is requeued then never leaves a rank ahead of the newest checkpoint).
    distributed.barrier()
    if step >= total and start_step == step:
        log.info("run already finished at step %d", step)
    collapsed = None if collapse is None else {**collapse.to_dict(), "total_steps": total}
    return TrainResult(cfg.run.dir, step, total, stopped, resumed_from, last, collapsed)


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


class Checkpoints:
    """When the loop checkpoints (every train.checkpoint_every_steps steps or _minutes, and whenever
    it stops) and the save itself: `TrainState` on rank 0, written in the background."""

    def __init__(
        self,
        cfg: DinoConfig,
        dist: distributed.DistInfo,
        state: TrainState,
        logs: dict[str, storage.AppendLog],
        guard: Callable[[], None],
    ) -> None:
        self.cfg, self.dist, self.state, self.logs, self.guard = cfg, dist, state, logs, guard
        self.writer = CheckpointWriter(cfg.run.dir, config_hash(cfg), cfg.train.keep_last)
        self.last_time = time.monotonic()

    def due_steps(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and step % every == 0

    def due_time(self) -> bool:
        minutes = self.cfg.train.checkpoint_every_minutes
        return bool(minutes) and time.monotonic() - self.last_time >= 60 * minutes

    def newest(self, start_step: int) -> int:
        """The newest complete checkpoint of this run (its start step before the first), for progress."""
        return start_step if self.writer.last_complete is None else self.writer.last_complete

    def save(self, step: int, train_seconds: float) -> None:
        """Collective: every rank's RNG state goes into rank 0's checkpoint."""
        self.state.step, self.state.train_seconds = step, train_seconds
        self.state.rng = distributed.all_gather_object(rng.capture())
        if self.dist.is_main:
            self.guard()
            # A remote run folder gets its logs published with each checkpoint (object stores cannot append).
            remote = [run_log for run_log in self.logs.values() if run_log.remote]
            self.writer.save(step, self.state.state_dict(), remote)
        self.last_time = time.monotonic()

    def wait(self) -> None:
        self.writer.wait()

    def close(self) -> None:
        self.writer.close()


class WindowReport:
    """Every metrics window: the k-NN monitor when due, skipped images, the reduced metrics line into
    metrics.jsonl, the tracker and the progress bar."""

    def __init__(self, cfg, device, dist, run: Run, data: TrainData, tracker, logs, start_step: int) -> None:
        spe = data.steps_per_epoch
        self.dist, self.tracker, self.logs, self.bad = dist, tracker, logs, data.bad
        self.window = MetricsWindow(device, run.schedules, spe, cfg.optim.batch_size, dist.world_size,
                                    run.end_step, cfg.run.dir, run.state.train_seconds)  # fmt: skip
        self.progress = TrainProgress(start_step, run.end_step, spe, cfg.train.progress and dist.is_main)
        self.monitor = KnnMonitor(cfg, spe, device)

    def __call__(self, step: int, due_knn: bool, teacher: torch.nn.Module) -> dict[str, float]:
        extra: dict[str, float] = {}
        if due_knn:
            result = self.monitor(teacher.backbone, step)
            extra = result.metrics()
            self.window.pause(result.seconds)
        if self.bad is not None:  # by this process's loader since it started, summed over ranks
            extra["skipped_images"] = distributed.sum_across(torch.tensor(float(self.bad.count))).item()
        last = self.window.reduce(step, extra)  # raises on a non-finite loss
        if self.dist.is_main:
            self.logs["metrics.jsonl"].append(json.dumps(last) + "\n")
            self.logs["train.log"].check()  # a log line the disk refused stops the run like a metric
            self.tracker.log_metrics({k: v for k, v in last.items() if k != "step"}, step)
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
