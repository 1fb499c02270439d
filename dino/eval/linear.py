"""Linear probe on a frozen backbone (the DINO protocol), checkpointed every epoch and resumable.

Input: the CLS tokens of the last `linear.n_last_blocks` blocks (each through the final norm),
concatenated, optionally with the average-pooled patch tokens of the last block. A linear layer
(N(0, 0.01) init, zero bias) is trained with SGD (momentum 0.9, no weight decay, lr 0.001 * batch /
256, cosine over the epochs) on RandomResizedCrop + flip views. Each view is seeded from (seed,
epoch, index) and each epoch's order from (seed, epoch), so the result depends on nothing else (not
on workers, not on where it was resumed): a probe killed mid-way and started again ends with the
same weights as an uninterrupted one.

State lives in `<run>/eval/linear/<target>-<data>-<probe hash>/checkpoints/<epoch>/` (written with
`dino.checkpoint`: files first, marker last); the result JSON beside it reports the final accuracy
and, labelled as such, the best over epochs (what the DINO paper reports).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2

from dino import checkpoint, distributed, storage
from dino.augment import IMAGENET_MEAN, IMAGENET_STD, sample_seed
from dino.data import epoch_permutation
from dino.eval.config import EvalConfig, _plain
from dino.eval.features import (
    Target,
    build_encoder,
    eval_dataset,
    evenly_spaced_subset,
    image_size,
    num_classes,
    resolve,
    split_features,
    write_result,
)
from dino.eval.knn import data_id

log = logging.getLogger("dino.eval")

# Keys of the probe config that do not change its result (left out of its identity hash).
NON_SEMANTIC = ("max_epochs",)


def train_transform(size: int, scale: tuple[float, float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class SeededViews(Dataset):
    """(epoch, index) -> (augmented view, label), the augmentation seeded from (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    order = epoch_permutation(num_samples, seed, epoch).tolist()
    return [[(epoch, i) for i in order[s : s + batch_size]] for s in range(0, num_samples, batch_size)]


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def build_head(dim: int, classes: int, seed: int) -> nn.Linear:
    """The probe: weights N(0, 0.01), zero bias, drawn from `seed` alone."""
    head = nn.Linear(dim, classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def learning_rates(cfg: EvalConfig) -> list[float]:
    """`linear.lr` as a list (one value: today's single probe)."""
    lr = cfg.linear.lr
    return [float(v) for v in lr] if isinstance(lr, list) else [float(lr)]


def split_for_choice(num_train: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held out) indices of the train split for choosing among learning rates: a fixed random
    `fraction` held out, drawn from `seed` alone."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + 17))
    held = max(1, round(fraction * num_train))
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def probe_id(cfg: EvalConfig) -> str:
    semantic = {k: v for k, v in _plain(cfg.linear).items() if k not in NON_SEMANTIC}
    lrs = learning_rates(cfg)
    if len(lrs) == 1:  # a single lr (or a one-element list) is today's probe: same identity, no held-out part
        semantic["lr"] = lrs[0]  # a float, as the field's type made it before lists were allowed
        semantic.pop("val_fraction")
    semantic.update(seed=cfg.seed, image_size=cfg.image_size)
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


def rank_batches(
    views: Dataset,
    batches: list[list[tuple[int, int]]],
    rank: int,
    world: int,
    workers: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int]]:
    """(images, labels, global batch size) of this rank's part of each global batch: every world-th
    image, so each rank decodes and augments only its own share. A rank whose part of a (last, short)
    batch is empty gets (None, None, n) and still takes the step with the others."""
    parts = [batch[rank::world] for batch in batches]
    loader = iter(
        DataLoader(
            views,
            batch_sampler=[p for p in parts if p],
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
    )
    for batch, part in zip(batches, parts, strict=True):
        images, labels = next(loader) if part else (None, None)
        yield images, labels, len(batch)


def probe_step(
    heads: list[nn.Linear],
    optimizers: list[torch.optim.Optimizer],
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    global_n: int,
    device: torch.device,
) -> list[float]:
    """One SGD step of every probe head (one per learning rate) on a global batch of `global_n` images
    of which this rank holds `images` (or none): the features are computed once for all heads.
    Summed gradients and losses over ranks, divided by the global batch: the update one process makes
    on the whole batch. Returns each head's mean loss on the batch."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=False)
    losses = [torch.zeros((), device=device) for _ in heads]
    if images is not None:
        with torch.no_grad():
            feats = encode(images.to(device, non_blocking=True))
        targets = labels.to(device)
        for i, head in enumerate(heads):
            losses[i] = F.cross_entropy(head(feats), targets, reduction="sum")
            losses[i].backward()
    params = [p for head in heads for p in head.parameters()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # One all-reduce per step: every head's gradients and losses, flattened together.
    flat = [*(g.flatten() for g in grads), *(loss.detach().reshape(1) for loss in losses)]
    total = distributed.sum_across(torch.cat(flat))
    offset = 0
    for p in params:
        p.grad = total[offset : offset + p.numel()].view_as(p) / global_n
        offset += p.numel()
    for optimizer in optimizers:
        optimizer.step()
    return [float(v) / global_n for v in total[offset:]]


def evaluate(
    head: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096
) -> tuple[float, float]:
    correct1 = correct5 = 0
    with torch.no_grad():
        for s in range(0, len(labels), batch):
            logits = head(features[s : s + batch])
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels[s : s + batch, None]
            correct1 += int(hit[:, :1].sum())
            correct5 += int(hit.sum())
    n = max(len(labels), 1)
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def evaluate_linear(
    cfg: EvalConfig, target: Target, should_stop: Callable[[], bool] | None = None
) -> LinearResult:
    """Train (or continue) the probe of `target`; see the module docstring."""
    if target.backbone is None:
        from dino.config import ConfigError

        raise ConfigError("baseline=pixels has no backbone to probe; use baseline=random or none")
    lin = cfg.linear
    dist = distributed.info()
    device = distributed.rank_device(cfg.device)
    backbone = target.backbone.to(device)
    for p in backbone.parameters():
        p.requires_grad = False
    encode = build_encoder(target, "blocks", lin.n_last_blocks, lin.avgpool)
    size = image_size(cfg, target.run_cfg)

    # Test features are deterministic (eval transform, frozen backbone): extracted once, cached.
    test = split_features(
        cfg, target, "test", limit=lin.max_test, kind="blocks", n_last=lin.n_last_blocks,
        avgpool=lin.avgpool, device=device, encoder=encode,
    )  # fmt: skip
    test_x, test_y = test.features.to(device), test.labels.to(device)
    train_base = eval_dataset(cfg, target.run_cfg, "train")
    classes = num_classes(train_base)
    train_images = evenly_spaced_subset(train_base, lin.max_train)
    lrs = learning_rates(cfg)
    val_x = val_y = None
    if len(lrs) > 1:  # choose among the lrs on a held-out part of the train split, never on test
        fit, held = split_for_choice(len(train_images), lin.val_fraction, cfg.seed)
        train = split_features(
            cfg, target, "train", limit=lin.max_train, kind="blocks", n_last=lin.n_last_blocks,
            avgpool=lin.avgpool, device=device, encoder=encode,
        )  # fmt: skip
        val_x, val_y = train.features[held].to(device), train.labels[held].to(device)
        train_images = Subset(train_images, fit)
    num_train = len(train_images)
    views = SeededViews(train_images, train_transform(size, lin.scale), cfg.seed)

    heads = [build_head(test_x.shape[1], classes, cfg.seed).to(device) for _ in lrs]
    base_lrs = [lr * lin.batch_size / 256 for lr in lrs]
    optimizers = [
        torch.optim.SGD(head.parameters(), lr=lr, momentum=lin.momentum, weight_decay=lin.weight_decay)
        for head, lr in zip(heads, base_lrs, strict=True)
    ]

    name = f"{target.key}-{data_id(cfg)}-{probe_id(cfg)}"
    state_dir = storage.join(target.eval_dir, "linear", name)
    histories: list[list[dict[str, float]]] = [[] for _ in lrs]
    start_epoch, resumed_from = 0, None
    latest = checkpoint.load_latest(state_dir)
    if latest is not None:
        state = latest.state
        # A single probe keeps the layout of before grids (head, optimizer, history).
        saved = zip(state["heads"], state["optimizers"], state["histories"], strict=True) if "heads" in state else [(state["head"], state["optimizer"], state["history"])]  # fmt: skip
        for i, (head_state, optimizer_state, history) in enumerate(saved):
            heads[i].load_state_dict(head_state, strict=True)
            optimizers[i].load_state_dict(optimizer_state)
            histories[i] = list(history)
        start_epoch = resumed_from = latest.step
        log.info("linear probe resumed from %s (epoch %d)", latest.path, latest.step)
    end_epoch = min(lin.epochs, lin.max_epochs or lin.epochs)
    started = time.monotonic()
    epoch = start_epoch
    while epoch < end_epoch:
        epoch_lrs = [cosine_lr(base, epoch, lin.epochs) for base in base_lrs]
        for optimizer, lr in zip(optimizers, epoch_lrs, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr
        batches = epoch_batches(num_train, lin.batch_size, cfg.seed, epoch)
        loss_sums = [0.0] * len(heads)
        for images, labels, global_n in rank_batches(
            views, batches, dist.rank, dist.world_size, cfg.workers, device
        ):
            losses = probe_step(heads, optimizers, encode, images, labels, global_n, device)
            loss_sums = [a + b for a, b in zip(loss_sums, losses, strict=True)]
        epoch += 1
        for i, head in enumerate(heads):
            top1, top5 = evaluate(head, test_x, test_y)
            row = {"epoch": epoch, "lr": epoch_lrs[i], "loss": loss_sums[i] / max(len(batches), 1), "top1": top1, "top5": top5}  # fmt: skip
            if val_x is not None:
                row["val_top1"] = evaluate(head, val_x, val_y)[0]
            histories[i].append(row)
            log.info(
                "linear probe epoch %d/%d%s: loss %.4f top-1 %.2f top-5 %.2f%s", epoch, lin.epochs,
                f" (lr {lrs[i]:g})" if len(lrs) > 1 else "", row["loss"], top1, top5,
                f" held-out top-1 {row['val_top1']:.2f}" if "val_top1" in row else "",
            )  # fmt: skip
        if dist.is_main:
            payload: dict[str, Any] = {"step": epoch, "config": _plain(cfg), "target": target.provenance}
            if len(heads) == 1:
                payload.update(head=heads[0].state_dict(), optimizer=optimizers[0].state_dict(), history=histories[0])  # fmt: skip
            else:
                payload.update(
                    heads=[h.state_dict() for h in heads],
                    optimizers=[o.state_dict() for o in optimizers],
                    histories=histories,
                )
            checkpoint.save(state_dir, epoch, payload, probe_id(cfg), keep_last=2)
        distributed.barrier()
        if should_stop is not None and should_stop():
            break

    # The reported head: the only one, or the lr whose final held-out accuracy is best (first on ties).
    chosen = 0
    if len(lrs) > 1 and histories[0]:
        chosen = max(range(len(lrs)), key=lambda i: (histories[i][-1]["val_top1"], -i))
    history = histories[chosen]
    last = history[-1] if history else {"top1": float("nan"), "top5": float("nan"), "epoch": 0}
    best = max(history, key=lambda h: h["top1"]) if history else last
    record = {
        "protocol": "linear",
        **target.provenance,
        "target": target.key,
        "data": _plain(cfg.data),
        "linear": _plain(lin),
        "seed": cfg.seed,
        "image_size": size,
        "num_train": num_train,
        "num_test": len(test_y),
        "feature_dim": test_x.shape[1],
        "epoch": epoch,
        "epochs": lin.epochs,
        "finished": epoch >= lin.epochs,
        "final": {"epoch": last["epoch"], "top1": last["top1"], "top5": last["top5"]},
        "best_over_epochs": {"epoch": best["epoch"], "top1": best["top1"], "top5": best["top5"]},
        "history": history,
        "state_dir": state_dir,
        "seconds": time.monotonic() - started,
        "time": time.time(),
    }
    if len(lrs) > 1:
        record["lr_grid"] = {
            "chosen_lr": lrs[chosen],
            "chosen_on": f"held-out {lin.val_fraction:g} of the train split ({len(val_y)} images)",
            "heads": [
                {"lr": lr, **{k: h[-1][k] for k in ("val_top1", "top1", "top5")}} if h else {"lr": lr}
                for lr, h in zip(lrs, histories, strict=True)
            ],
        }
    path = storage.join(target.eval_dir, "linear", f"{name}.json")
    write_result(path, record)
    return LinearResult(
        epoch, lin.epochs, last["top1"], best["top1"], int(best["epoch"]), path, state_dir, resumed_from, record,
        {k: v.detach().cpu().clone() for k, v in heads[chosen].state_dict().items()},
    )  # fmt: skip


def run_linear(
    overrides: list[str] | tuple[str, ...], should_stop: Callable[[], bool] | None = None
) -> LinearResult:
    """`dinolab eval linear`: resolve the checkpoint from overrides and train/continue its probe."""
    cfg, target = resolve(overrides)
    distributed.setup(cfg.device)  # torchrun/SLURM: one process per device, each its share of a batch
    try:
        return evaluate_linear(cfg, target, should_stop)
    finally:
        distributed.destroy()
