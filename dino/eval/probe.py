"""The linear probe's parts: its views, batches, schedule, head, SGD step and test accuracy.

`linear.evaluate_linear` puts them together. Everything here is a function of the seed, the epoch
and the rank's share of a batch, so a resumed or data-parallel probe does what one process does.

The heads of one probe (`ProbeHeads`): one per learning rate of `linear.lr`, their SGD optimizers and
per-epoch histories: the single list of what a probe checkpoint holds, and which head is reported.
All heads train on the same frozen features in one pass (`probe_step`); with a single learning rate
the checkpoint keeps the layout it had before lr grids (`head`, `optimizer`, `history`), so probes
saved then resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from dino.data.datasets import epoch_permutation
from dino.eval.config import EvalConfig, LinearConfig
from dino.io import distributed
from dino.method.augment import IMAGENET_MEAN, IMAGENET_STD


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


# ---- the heads of one probe (one per learning rate) -------------------------------------------------
@dataclass
class ProbeHeads:
    lrs: list[float]
    """`linear.lr` as a list: the learning rates per 256 images."""
    heads: list[nn.Linear]
    optimizers: list[torch.optim.SGD]
    base_lrs: list[float]
    """Each head's learning rate for the batch size (lr * batch_size / 256), before the cosine."""
    histories: list[list[dict[str, float]]]
    """Each head's rows, one per finished epoch (loss, top-1/5, held-out top-1 for a grid)."""

    @classmethod
    def build(
        cls, lrs: list[float], lin: LinearConfig, dim: int, classes: int, seed: int, device: torch.device
    ) -> ProbeHeads:
        heads = [build_head(dim, classes, seed).to(device) for _ in lrs]
        base_lrs = [lr * lin.batch_size / 256 for lr in lrs]
        optimizers = [
            torch.optim.SGD(head.parameters(), lr=lr, momentum=lin.momentum, weight_decay=lin.weight_decay)
            for head, lr in zip(heads, base_lrs, strict=True)
        ]
        return cls(lrs, heads, optimizers, base_lrs, [[] for _ in lrs])

    def set_epoch(self, epoch: int, epochs: int) -> list[float]:
        """Set each optimizer's learning rate for `epoch` (cosine over `epochs`); returns them."""
        epoch_lrs = [cosine_lr(base, epoch, epochs) for base in self.base_lrs]
        for optimizer, lr in zip(self.optimizers, epoch_lrs, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return epoch_lrs

    def state_dict(self) -> dict[str, Any]:
        if len(self.heads) == 1:
            return {
                "head": self.heads[0].state_dict(),
                "optimizer": self.optimizers[0].state_dict(),
                "history": self.histories[0],
            }
        return {
            "heads": [h.state_dict() for h in self.heads],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "histories": self.histories,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "heads" in state:
            saved = zip(state["heads"], state["optimizers"], state["histories"], strict=True)
        else:
            saved = [(state["head"], state["optimizer"], state["history"])]
        for i, (head_state, optimizer_state, history) in enumerate(saved):
            self.heads[i].load_state_dict(head_state, strict=True)
            self.optimizers[i].load_state_dict(optimizer_state)
            self.histories[i] = list(history)

    def chosen(self) -> int:
        """The reported head: the only one, or the lr whose final held-out accuracy is best (the
        first on ties) — never chosen on the test split."""
        if len(self.lrs) > 1 and self.histories[0]:
            return max(range(len(self.lrs)), key=lambda i: (self.histories[i][-1]["val_top1"], -i))
        return 0
