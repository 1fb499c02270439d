"""DINO pretraining: `run(cfg)` sets up, resumes from the newest complete checkpoint, loops, closes.

Resume belongs here: started again in the same run.dir, a run continues exactly (same weights as an
uninterrupted run) from its newest complete checkpoint. Requeueing belongs to the launcher, which only
needs `run(cfg, should_stop=...)`: when `should_stop()` turns true the loop finishes the current step,
writes a complete checkpoint and returns with `stopped=True`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from dino import bad_images, checkpoint, distributed, rng, run_lock, shards, storage
from dino.augment import MultiCropAugment, sample_seed
from dino.batch_augment import BatchMultiCrop
from dino.cards import device_card
from dino.checkpoint_writer import CheckpointWriter
from dino.collapse import MARKER, CollapseGuard, CollapseRule
from dino.config import ConfigError, DinoConfig, flatten, to_dict
from dino.data import DecodedDataset, MultiCropDataset, build_dataset, build_loader, steps_per_epoch
from dino.eval.monitor import KnnMonitor
from dino.loss import DINOLoss
from dino.models import build_student_teacher
from dino.progress import TrainProgress, setup_logging
from dino.run_identity import config_hash, semantic_diff
from dino.schedules import build_schedules
from dino.step import StepState, build_optimizer, train_step
from dino.tracking import build_tracker
from dino.train_metrics import MetricsWindow

log = logging.getLogger("dino.train")


class ConfigMismatchError(RuntimeError):
    """The run directory or checkpoint belongs to another config; the message lists the keys."""


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
    step, kind, since, entropy, kl, signal, total_steps (dino/collapse.py)."""

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def read_collapse(run_dir: str) -> dict | None:
    """The collapse guard's decision saved in run.dir (None: the run has not collapsed)."""
    path = storage.join(run_dir, MARKER)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        return None


def prepare_run_dir(cfg: DinoConfig, is_main: bool) -> None:
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
) -> TrainResult:
    """Train (or continue training) the run described by `cfg`; see the module docstring.

    `on_start()` is called on rank 0 once this process holds the run folder (dino/run_lock.py) and
    before it writes anything; `on_progress(metrics)` on rank 0 after every metric reduction and
    checkpoint (the launcher keeps its run record's step, loss and heartbeat current with them).
    A write the disk refuses stops the run with `storage.WriteError` naming the file and the
    checkpoint the same command resumes from.
    """
    try:
        return _run(cfg, should_stop, on_progress, on_start)
    except storage.WriteError as err:  # a full disk: what failed, and where the run resumes from
        raise storage.WriteError(f"{err}. {_resume_point(cfg.run.dir)}") from None


def _run(cfg, should_stop, on_progress, on_start) -> TrainResult:
    dist = distributed.setup(cfg.train.device)  # the rank's device, then its process group
    device = dist.device
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    logs: dict[str, storage.AppendLog] = {}
    lock = _lock_run_dir(cfg, dist, should_stop or (lambda: False))  # before any write: one writer
    try:
        if dist.is_main:
            if on_start is not None:
                on_start()
            logs = {
                name: storage.AppendLog(storage.join(cfg.run.dir, name))
                for name in ("train.log", "metrics.jsonl")
            }
        setup_logging(logs.get("train.log"))
        prepare_run_dir(cfg, dist.is_main)  # before tracking: a folder of another config is refused
        stopped_before = _collapsed_before(cfg, dist)
        if stopped_before is not None:
            return stopped_before
        guard = lock.check if lock is not None else (lambda: None)
        return _tracked(
            cfg, device, dist, logs, should_stop or (lambda: False), on_progress or (lambda m: None), guard
        )
    finally:
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
    found = read_collapse(cfg.run.dir)
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


def _tracked(cfg, device, dist, logs, should_stop, on_progress, guard) -> TrainResult:
    """Train with the tracker open; its MLflow run ends FINISHED, KILLED (stopped to be requeued)
    or FAILED."""
    tracker = build_tracker(cfg, dist.is_main)
    status = "FAILED"
    try:
        # The card is a throughput-shaping key: `sweep plan` uses this run's img/s for runs of the
        # same shape on the same card (launcher/cost.py).
        tracker.set_tags({"dinolab.config_hash": config_hash(cfg), "dinolab.card": device_card(device)})
        tracker.log_artifact(storage.join(cfg.run.dir, "config.yaml"))
        result = _train(cfg, device, dist, tracker, logs, should_stop, on_progress, guard)
        # A collapsed run ends FINISHED (it will not be resumed, its reports show its last metrics)
        # with the tag dinolab.state=collapsed; KILLED is a run stopped to be requeued.
        done = result.finished or result.collapsed is not None
        status = "FINISHED" if done else "KILLED"
        if done and logs:
            tracker.log_artifact(logs["metrics.jsonl"].local_path, "")
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


def augment_on_device(cfg: DinoConfig, device: torch.device) -> bool:
    """data.augment_device: gpu = batched on the training device; auto = that when it is a GPU."""
    return cfg.data.augment_device == "gpu" or (cfg.data.augment_device == "auto" and device.type == "cuda")


def build_pipeline(cfg: DinoConfig, device: torch.device):
    """(base dataset, loader dataset, batch augmentation or None) for `data.augment_device`: per-image
    crops in the loader workers, or decoded images augmented batched on `device`."""
    base = build_dataset(cfg.data, cfg.train.seed)
    if augment_on_device(cfg, device):
        if cfg.data.name in ("imagefolder", "webdataset") and not cfg.data.max_decode_size:
            log.warning(
                "data.augment_device=gpu decodes images at full size and pads each batch to its largest "
                "image; set data.max_decode_size (e.g. 512, the shorter side) to bound memory and transfer"
            )
        return base, DecodedDataset(base), BatchMultiCrop(cfg.crops)
    return base, MultiCropDataset(base, MultiCropAugment(cfg.crops), cfg.train.seed), None


def restore_latest(
    cfg: DinoConfig,
    parts: dict[str, torch.nn.Module | torch.optim.Optimizer | torch.amp.GradScaler],
    spe: int,
) -> checkpoint.LoadedCheckpoint | None:
    """Load the newest complete checkpoint of cfg.run.dir into `parts` (keyed as in the checkpoint);
    None when there is none. A checkpoint of another config is refused, naming the keys."""
    latest = checkpoint.load_latest(cfg.run.dir)
    if latest is None:
        return None
    diff = semantic_diff(latest.state["config"], cfg)
    if diff:
        raise ConfigMismatchError(
            f"checkpoint {latest.path} was written by another config: {'; '.join(diff)}"
        )
    for key, part in parts.items():
        if isinstance(part, torch.nn.Module):
            part.load_state_dict(latest.state[key], strict=True)
        else:
            part.load_state_dict(latest.state[key])
    log.info("resumed from %s (step %d, epoch %.2f)", latest.path, latest.step, latest.step / spe)
    return latest


def build_models(cfg: DinoConfig, device: torch.device):
    """(student, teacher, loss, optimizer, scaler) of a fresh run, initialised from train.seed alone
    (identical on every rank). `train.compile` compiles the backbones in place (state dict keys stay)."""
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    if cfg.train.init_weights:
        _init_from(cfg, student, teacher)
    student, teacher = student.to(device), teacher.to(device)
    num_crops = 2 + cfg.crops.num_local
    loss_fn = DINOLoss(cfg.head.out_dim, num_crops, cfg.teacher.student_temp, cfg.teacher.center_momentum)
    optimizer = build_optimizer(student, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    if cfg.train.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    return student, teacher, loss_fn.to(device), optimizer, scaler


def _init_from(cfg: DinoConfig, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """train.init_weights: the file's backbone (and head, when it holds one) into both networks,
    strictly; a file without a head keeps the freshly initialised one."""
    from dino import weights

    loaded = weights.read(cfg.train.init_weights, cfg.train.init_weights_key)
    backbone = weights.backbone_for(loaded, cfg.model.name, cfg.model.patch_size, cfg.crops.global_size)
    for net in (student, teacher):
        net.backbone.load_state_dict(backbone.state_dict(), strict=True)
        if loaded.head is not None:
            weights.load_head(loaded, net.head)
    log.info(
        "initialised from %s (%s, %s%s; sha256 %s)", loaded.path, loaded.format, loaded.key,
        ", with its head" if loaded.head is not None else ", backbone only", loaded.sha256[:12],
    )  # fmt: skip


def _train(cfg, device, dist, tracker, logs, should_stop, on_progress, guard) -> TrainResult:
    """`guard()` raises when this process no longer holds the run folder (a remote lease taken over):
    called before each checkpoint, so a process that lost the folder never writes into it again."""
    run_hash = config_hash(cfg)
    log.info("run %s (config %s) on %s, %d process(es)", cfg.run.dir, run_hash, device, dist.world_size)
    # Randomness after initialisation (drop path) gets a per-rank stream, set below.
    student, teacher, loss_fn, optimizer, scaler = build_models(cfg, device)

    base, dataset, batch_augment = build_pipeline(cfg, device)
    bad = bad_images.of(base)  # image files: unreadable ones are skipped (counted) or fail the run
    batched = batch_augment is not None
    log.info(
        "augmentation: %s",
        f"batched on {device.type} (loader workers only decode)"
        if batched
        else "per image in the loader workers",
    )
    sharded = isinstance(base, shards.ShardedDataset)
    spe = (shards.steps_per_epoch if sharded else steps_per_epoch)(
        len(dataset), cfg.optim.batch_size, dist.world_size
    )
    if spe == 0:
        raise ConfigError(
            f"the dataset has {len(dataset)} images, fewer than one global batch "
            f"(optim.batch_size={cfg.optim.batch_size} x {dist.world_size} process(es))"
        )
    schedules = build_schedules(cfg, spe, dist.world_size)
    end_step = min(schedules.total_steps, cfg.train.max_steps or schedules.total_steps)
    if schedules.freeze_last_layer_steps >= end_step:
        log.warning(
            "optim.freeze_last_layer=%s epoch(s) spans the whole run (%d steps): the head's last layer "
            "never trains; use optim.freeze_last_layer=0 for runs this short",
            cfg.optim.freeze_last_layer, end_step,
        )  # fmt: skip

    latest = restore_latest(cfg, {"student": student, "teacher": teacher, "optimizer": optimizer,
                                  "scaler": scaler, "loss": loss_fn}, spe)  # fmt: skip
    resumed_from = latest.step if latest else None
    start_step = resumed_from or 0
    # Every rank reads the checkpoint itself: on a node-local run.dir the others would silently
    # start over while rank 0 resumes.
    found = distributed.all_gather_object(start_step)
    if len(set(found)) > 1:
        raise ConfigError(
            f"the ranks see different checkpoints in run.dir={cfg.run.dir} (newest step by rank: {found}): "
            "run.dir must be one folder shared by every node (a shared file system or s3://), not a node-local path"
        )
    if distributed.is_initialized():  # torchrun's world of 1 too: the multi-GPU code path on one GPU
        student = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    student_module = student.module if isinstance(student, DistributedDataParallel) else student
    if latest is not None:
        rng.restore(latest.state["rng"][min(dist.rank, len(latest.state["rng"]) - 1)])
    else:
        torch.manual_seed(cfg.train.seed + dist.rank)
    if dist.is_main:
        tracker.log_params(flatten(to_dict(cfg)))

    state = StepState(
        student, student_module, teacher, loss_fn, optimizer, scaler, schedules,
        device.type, cfg.train.precision, cfg.optim.clip_grad,
    )  # fmt: skip
    if sharded:
        stream = shards.ShardStream(
            base, None if batched else dataset.augment, cfg.train.seed, cfg.optim.batch_size, start_step, end_step,
            dist.rank, dist.world_size,
        )  # fmt: skip
        loader = shards.build_loader(stream, cfg.train.workers, device.type == "cuda")
    else:
        loader = build_loader(
            cfg, dataset, start_step, end_step, dist.rank, dist.world_size, device.type == "cuda"
        )
    progress = TrainProgress(start_step, end_step, spe, cfg.train.progress and dist.is_main)
    save_step = [start_step]  # newest complete checkpoint, for progress reports
    writer = CheckpointWriter(
        cfg.run.dir, run_hash, cfg.train.keep_last, lambda step, path: save_step.__setitem__(0, step)
    )

    def save(step: int) -> None:
        rng_states = distributed.all_gather_object(rng.capture())
        if not dist.is_main:
            return
        guard()
        payload = {
            "student": student_module.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "loss": loss_fn.state_dict(),
            "step": step,
            "epoch": step / spe,
            "data_position": {"epoch": step // spe, "batch_in_epoch": step % spe, "steps_per_epoch": spe},
            "rng": rng_states,
            "train_seconds": window.train_seconds,
            "config": to_dict(cfg),
        }
        # A remote run folder gets its logs published with each checkpoint (object stores cannot append).
        writer.save(step, payload, [run_log for run_log in logs.values() if run_log.remote])

    # Wall seconds carried in checkpoints (absent before dinolab 0.1.1), for GPU-hours.
    train_seconds = float(latest.state.get("train_seconds", 0.0)) if latest else 0.0
    window = MetricsWindow(
        device, schedules, spe, cfg.optim.batch_size, dist.world_size, end_step, cfg.run.dir, train_seconds
    )
    last: dict[str, float] = {}
    last_save_time, step, stopped = time.monotonic(), start_step, False
    monitor = KnnMonitor(cfg, spe, device)
    # Not carried in checkpoints: a resumed run counts its patience again (it can only stop later).
    collapse_guard = (
        CollapseGuard(CollapseRule.from_config(cfg, spe), start_step) if cfg.train.collapse_stop else None
    )
    collapse = None

    try:
        for item in loader:
            if batch_augment is not None:
                # Crop parameters from (seed, step, rank) alone: exact resume, any number of workers.
                gen = torch.Generator().manual_seed(sample_seed(cfg.train.seed, step, dist.rank))
                images, sizes = item[0].to(device, non_blocking=True), item[1]
                crops = batch_augment(images, sizes, gen)
            else:
                crops = [c.to(device, non_blocking=True) for c in item[0]]
            window.add(train_step(state, crops, step), step)
            step += 1
            final = step >= end_step
            due_steps = (
                bool(cfg.train.checkpoint_every_steps) and step % cfg.train.checkpoint_every_steps == 0
            )
            due_knn = monitor.due(step, final)
            if not (step % cfg.train.log_every == 0 or due_steps or final or due_knn):
                continue
            # Stop requests and the checkpoint clock are read only here, and agreed on by all ranks,
            # so every rank takes the same branch (checkpointing gathers RNG states collectively).
            minutes = cfg.train.checkpoint_every_minutes
            stop_now, due_time = distributed.any_true(
                should_stop(), bool(minutes) and time.monotonic() - last_save_time >= 60 * minutes
            )
            extra: dict[str, float] = {}
            if due_knn:
                result = monitor(teacher.backbone, step)
                extra = result.metrics()
                window.pause(result.seconds)
            if bad is not None:  # by this process's loader since it started, summed over ranks
                extra["skipped_images"] = distributed.sum_across(torch.tensor(float(bad.count))).item()
            last = window.reduce(step, extra)  # raises on a non-finite loss, before anything is saved
            if dist.is_main:
                logs["metrics.jsonl"].append(json.dumps(last) + "\n")
                logs["train.log"].check()  # a log line the disk refused stops the run like a metric
                tracker.log_metrics({k: v for k, v in last.items() if k != "step"}, step)
            progress.update(step, last)
            if collapse_guard is not None and not final:  # the same window, so the same answer, on every rank
                collapse = collapse_guard.update(step, last["teacher_entropy"], last["kl"])
            if due_steps or due_time or final or stop_now or collapse is not None:
                save(step)
                last_save_time = time.monotonic()
            if dist.is_main:
                on_progress({**last, "total_steps": schedules.total_steps, "checkpoint_step": save_step[0]})
            if collapse is not None:
                break
            if stop_now and not final:
                stopped = True
                log.info("stop requested: checkpoint written at step %d", step)
                break
    finally:
        progress.close()
        writer.wait()  # whatever happened, the save in flight ends before the process may exit
    if bad is not None and last.get("skipped_images"):
        log.warning(
            "%d unreadable image(s) were skipped and replaced by the next readable one; the warnings "
            "above name them", last["skipped_images"],
        )  # fmt: skip
    writer.close()  # raises if the newest checkpoint could not be written
    # Rank 0 alone writes checkpoints; the others return only once it is complete (a job that ends
    # or is requeued then never leaves a rank ahead of the newest checkpoint).
    distributed.barrier()
    if step >= schedules.total_steps and start_step == step:
        log.info("run already finished at step %d", step)
    collapsed = None
    if collapse is not None:
        collapsed = {**collapse.to_dict(), "total_steps": schedules.total_steps}
        _record_collapse(cfg, dist, tracker, collapsed, last)
    return TrainResult(cfg.run.dir, step, schedules.total_steps, stopped, resumed_from, last, collapsed)


def _record_collapse(cfg, dist, tracker, collapsed: dict, last: dict[str, float]) -> None:
    """After the final checkpoint is complete: the decision in run.dir (a restart reads it), on the
    MLflow run, and one WARNING line."""
    if dist.is_main:
        collapsed["gpu_hours"] = last.get("gpu_hours", 0.0)
        storage.atomic_write_text(storage.join(cfg.run.dir, MARKER), json.dumps(collapsed, indent=1))
        tracker.set_tags({"dinolab.state": "collapsed", "dinolab.collapse_step": str(collapsed["step"]),
                          "dinolab.collapse_signal": collapsed["signal"],
                          "dinolab.total_steps": str(collapsed["total_steps"])})  # fmt: skip
    log.warning(
        "teacher output collapsed (%s): run stopped at step %d of %d with a final checkpoint; "
        "train.collapse_stop=false trains it on", collapsed["signal"], collapsed["step"], collapsed["total_steps"],
    )  # fmt: skip
    distributed.barrier()  # no rank exits before the marker exists
