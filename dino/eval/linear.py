"""Linear probe on a frozen backbone (the DINO protocol), checkpointed every epoch and resumable.

Input: the CLS tokens of the last `linear.n_last_blocks` blocks (each through the final norm),
concatenated, optionally with the average-pooled patch tokens of the last block. A linear layer
(N(0, 0.01) init, zero bias) is trained with SGD (momentum 0.9, no weight decay, lr 0.001 * batch /
256, cosine over the epochs) on RandomResizedCrop + flip views. Each view is seeded from (seed,
epoch, index) and each epoch's order from (seed, epoch), so the result depends on nothing else (not
on workers, not on where it was resumed): a probe killed mid-way and started again ends with the
same weights as an uninterrupted one.

State lives in `<run>/eval/linear/<target>-<data>-<probe hash>/checkpoints/<epoch>/` (written with
`dino.io.checkpoint`: files first, marker last); the result JSON beside it reports the final accuracy
and, labelled as such, the best over epochs (what the DINO paper reports).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Subset

from dino.config.identity import identity_items
from dino.config.schema import ConfigError, to_dict
from dino.data.datasets import MultiCropDataset
from dino.eval.config import EvalConfig
from dino.eval.encoders import build_encoder
from dino.eval.evaluated import Evaluated, resolve
from dino.eval.features import split_features
from dino.eval.knn import data_id
from dino.eval.probe import (
    ProbeHeads,
    epoch_batches,
    evaluate,
    learning_rates,
    probe_step,
    rank_batches,
    split_for_choice,
    train_transform,
)
from dino.eval.results import (
    LINEAR,
    LINEAR_BEST_TOP1,
    LINEAR_LR,
    LINEAR_TOP1,
    LINEAR_TOP5,
    linear_grid_metric,
    log_result,
    write_result,
)
from dino.eval.splits import eval_dataset, evenly_spaced_subset, image_size, num_classes
from dino.io import checkpoint, distributed, storage, watchdog

log = logging.getLogger("dino.eval")


def probe_id(cfg: EvalConfig) -> str:
    """Short hash of what can change the probe's result: same id, same state folder (a resume).

    The fields come from `LinearConfig`'s marks (`dino.config.identity.identity_items`); what a mark
    cannot say is written out below, each case pinned by tests/unit/test_probe_ids.py."""
    semantic = identity_items(cfg.linear)
    lrs = learning_rates(cfg)
    # Not a mark: whether val_fraction counts depends on lr, another field's value.
    if len(lrs) == 1:  # a single lr (or a one-element list) is today's probe: same identity, no held-out part
        semantic["lr"] = lrs[0]  # a float, as the field's type made it before lists were allowed
        semantic.pop("val_fraction")
    # Not marks: these are EvalConfig's own fields, outside the probe's section.
    semantic.update(seed=cfg.seed, image_size=cfg.image_size)
    # Not a mark: a key no field holds, added when either subset is set.
    if cfg.linear.max_train or cfg.linear.max_test:
        # Subsets were the first N images before they were evenly spaced: a new probe, not a resume.
        semantic["subsets"] = "evenly_spaced"
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class LinearResult:
    epoch: int
    epochs: int
    final_top1: float
    best_top1: float
    best_epoch: int
    path: str
    state_dir: str
    resumed_from: int | None
    record: dict[str, Any]
    weights: dict[str, torch.Tensor]

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs


@dataclass
class _ProbeData:
    """What the probe trains on (seeded views of the train split) and is measured on (cached test
    features; with an lr grid, the held-out part of the train split that chooses the lr)."""

    views: MultiCropDataset
    num_train: int
    classes: int
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None


def _probe_data(
    cfg: EvalConfig, target: Evaluated, encode: Any, device: torch.device, size: int
) -> _ProbeData:
    lin = cfg.linear
    features = {"kind": "blocks", "n_last": lin.n_last_blocks, "avgpool": lin.avgpool, "device": device, "encoder": encode}  # fmt: skip
    # Test features are deterministic (eval transform, frozen backbone): extracted once, cached.
    test = split_features(cfg, target, "test", limit=lin.max_test, **features)
    test_x, test_y = test.features.to(device), test.labels.to(device)
    train_base = eval_dataset(cfg, target.run_cfg, "train")
    train_images = evenly_spaced_subset(train_base, lin.max_train)
    val_x = val_y = None
    # With an lr grid, the lr is chosen on a held-out part of the train split, never on test.
    if len(learning_rates(cfg)) > 1:
        fit, held = split_for_choice(len(train_images), lin.val_fraction, cfg.seed)
        train = split_features(cfg, target, "train", limit=lin.max_train, **features)
        val_x, val_y = train.features[held].to(device), train.labels[held].to(device)
        train_images = Subset(train_images, fit)
    # Views seeded from (seed, epoch, index), as pretraining's crops are.
    views = MultiCropDataset(train_images, train_transform(size, lin.scale), cfg.seed)
    return _ProbeData(views, len(train_images), num_classes(train_base), test_x, test_y, val_x, val_y)


def _measure_epoch(
    probes: ProbeHeads, data: _ProbeData, epoch: int, epochs: int, epoch_lrs: list[float], losses: list[float]
) -> None:
    """Each head's row for the epoch just finished: its mean loss, test top-1/5, held-out top-1."""
    for i, head in enumerate(probes.heads):
        top1, top5 = evaluate(head, data.test_x, data.test_y)
        row = {"epoch": epoch, "lr": epoch_lrs[i], "loss": losses[i], "top1": top1, "top5": top5}
        if data.val_x is not None:
            row["val_top1"] = evaluate(head, data.val_x, data.val_y)[0]
        probes.histories[i].append(row)
        log.info(
            "linear probe epoch %d/%d%s: loss %.4f top-1 %.2f top-5 %.2f%s", epoch, epochs,
            f" (lr {probes.lrs[i]:g})" if len(probes.lrs) > 1 else "", row["loss"], top1, top5,
            f" held-out top-1 {row['val_top1']:.2f}" if "val_top1" in row else "",
        )  # fmt: skip


def evaluate_linear(
    cfg: EvalConfig, target: Evaluated, should_stop: Callable[[], bool] | None = None
) -> LinearResult:
    """Train (or continue) the probe of `target`; see the module docstring."""
    if target.backbone is None:
        raise ConfigError("baseline=pixels has no backbone to probe; use baseline=random or none")
    lin = cfg.linear
    dist = distributed.info()
    device = distributed.rank_device(cfg.device)
    backbone = target.backbone.to(device)
    for p in backbone.parameters():
        p.requires_grad = False
    encode = build_encoder(target, "blocks", lin.n_last_blocks, lin.avgpool)
    size = image_size(cfg, target.run_cfg)
    data = _probe_data(cfg, target, encode, device, size)
    probes = ProbeHeads.build(learning_rates(cfg), lin, data.test_x.shape[1], data.classes, cfg.seed, device)

    name = f"{target.key}-{data_id(cfg)}-{probe_id(cfg)}"
    state_dir = storage.join(target.eval_dir, LINEAR, name)
    epoch, resumed_from = 0, None
    latest = checkpoint.load_latest(state_dir)
    if latest is not None:
        probes.load_state_dict(latest.state)
        epoch = resumed_from = latest.step
        log.info("linear probe resumed from %s (epoch %d)", latest.path, latest.step)
    end_epoch = min(lin.epochs, lin.max_epochs or lin.epochs)
    started = time.monotonic()
    while epoch < end_epoch:
        epoch_lrs = probes.set_epoch(epoch, lin.epochs)
        batches = epoch_batches(data.num_train, lin.batch_size, cfg.seed, epoch)
        loss_sums = [0.0] * len(probes.heads)
        for images, labels, global_n in rank_batches(
            data.views, batches, dist.rank, dist.world_size, cfg.workers, device
        ):
            losses = probe_step(probes.heads, probes.optimizers, encode, images, labels, global_n, device)
            watchdog.progress()
            loss_sums = [a + b for a, b in zip(loss_sums, losses, strict=True)]
        epoch += 1
        _measure_epoch(
            probes, data, epoch, lin.epochs, epoch_lrs, [s / max(len(batches), 1) for s in loss_sums]
        )
        if dist.is_main:
            payload = {
                "step": epoch,
                "config": to_dict(cfg),
                "target": target.provenance,
                **probes.state_dict(),
            }
            checkpoint.save(state_dir, epoch, payload, probe_id(cfg), keep_last=2)
        distributed.barrier()
        if should_stop is not None and should_stop():
            break

    record = _record(cfg, target, probes, data, size, epoch, state_dir, time.monotonic() - started)
    path = storage.join(target.eval_dir, LINEAR, f"{name}.json")
    write_result(path, record)
    final, best = record["final"], record["best_over_epochs"]
    return LinearResult(
        epoch, lin.epochs, final["top1"], best["top1"], int(best["epoch"]), path, state_dir, resumed_from, record,
        {k: v.detach().cpu().clone() for k, v in probes.heads[probes.chosen()].state_dict().items()},
    )  # fmt: skip


def _record(
    cfg: EvalConfig, target: Evaluated, probes: ProbeHeads, data: _ProbeData, size: int, epoch: int,
    state_dir: str, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """The result JSON: the reported head's final and best-over-epochs accuracy, its history and,
    for an lr grid, every head's and which lr was chosen on what."""
    lin = cfg.linear
    chosen = probes.chosen()
    history = probes.histories[chosen]
    last = history[-1] if history else {"top1": float("nan"), "top5": float("nan"), "epoch": 0}
    best = max(history, key=lambda h: h["top1"]) if history else last
    record = {
        "protocol": LINEAR,
        **target.provenance,
        "target": target.key,
        "data": to_dict(cfg.data),
        "linear": to_dict(lin),
        "seed": cfg.seed,
        "image_size": size,
        "num_train": data.num_train,
        "num_test": len(data.test_y),
        "feature_dim": data.test_x.shape[1],
        "epoch": epoch,
        "epochs": lin.epochs,
        "finished": epoch >= lin.epochs,
        "final": {"epoch": last["epoch"], "top1": last["top1"], "top5": last["top5"]},
        "best_over_epochs": {"epoch": best["epoch"], "top1": best["top1"], "top5": best["top5"]},
        "history": history,
        "state_dir": state_dir,
        "seconds": seconds,
        "time": time.time(),
    }
    if len(probes.lrs) > 1:
        record["lr_grid"] = {
            "chosen_lr": probes.lrs[chosen],
            "chosen_on": f"held-out {lin.val_fraction:g} of the train split ({len(data.val_y)} images)",
            "heads": [
                {"lr": lr, **{k: h[-1][k] for k in ("val_top1", "top1", "top5")}} if h else {"lr": lr}
                for lr, h in zip(probes.lrs, probes.histories, strict=True)
            ],
        }
    return record


def run_linear(
    overrides: list[str] | tuple[str, ...],
    should_stop: Callable[[], bool] | None = None,
    on_hang: Callable[[watchdog.Hang], None] | None = None,
) -> LinearResult:
    """`dinolab eval linear`: resolve the checkpoint from overrides, train/continue its probe and, once
    finished, log the result to the run's MLflow run. A rank without progress for cfg.hang_timeout_s
    stops the process (`on_hang` first, dino/io/watchdog.py)."""
    cfg, target = resolve(overrides)
    # torchrun/SLURM: one process per device, each its share of a batch
    dist = distributed.setup(cfg.device, cfg.hang_timeout_s)
    main = dist.is_main
    health = watchdog.Watchdog(target.eval_dir, dist.rank, dist.world_size,
                               cfg.hang_timeout_s, job=LINEAR, on_hang=on_hang).start()  # fmt: skip
    try:
        result = evaluate_linear(cfg, target, should_stop)
    finally:
        health.stop()
        distributed.destroy()
    if main and result.finished:
        log_result(cfg, result.record, linear_metrics(result.record), result.path)
    return result


def linear_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The final and best top-1, final top-5 and, for a grid, the chosen lr and every head's top-1."""
    final, best = record["final"], record["best_over_epochs"]
    metrics = {LINEAR_TOP1: final["top1"], LINEAR_TOP5: final["top5"], LINEAR_BEST_TOP1: best["top1"]}
    grid = record.get("lr_grid")
    if grid:
        metrics[LINEAR_LR] = grid["chosen_lr"]
        for head in grid["heads"]:
            metrics[linear_grid_metric(head["lr"], "val_top1")] = head["val_top1"]
            metrics[linear_grid_metric(head["lr"], "top1")] = head["top1"]
    return metrics
