"""Periodic k-NN of the teacher during pretraining (`monitor.knn_every_epochs` / `knn_every_steps`).

A learning curve without separate jobs: every N steps the live teacher backbone encodes a fixed,
evenly spaced subset of the train split (the bank) and of the test split (the queries) under the
evaluation transform of `dinolab eval knn`, and the weighted k-NN vote of the same code gives top-1
and top-5. Nothing is cached (the teacher changes between calls). The monitor runs inside
`torch.random.fork_rng`, so training with and without it gives the same weights. Under
torch.distributed each rank encodes every world-th image, the features are gathered, and every rank
gets the same accuracy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from dino.config.schema import DinoConfig, to_dict
from dino.eval import results
from dino.eval.config import EvalConfig, EvalDataConfig, KnnConfig
from dino.eval.encoders import cls_features
from dino.eval.features import encode_dataset
from dino.eval.knn import knn_accuracy
from dino.eval.splits import (
    TransformedDataset,
    eval_dataset,
    eval_transform,
    evenly_spaced_subset,
    num_classes,
)
from dino.io import distributed

log = logging.getLogger("dino.train")

TEMPERATURE = KnnConfig().temperature  # the vote of `dinolab eval knn`
MAX_WORKERS = 8


@dataclass
class MonitorResult:
    top1: float
    top5: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {results.MONITOR_TOP1: self.top1, results.MONITOR_TOP5: self.top5}


class KnnMonitor:
    def __init__(self, cfg: DinoConfig, steps_per_epoch: int, device: torch.device) -> None:
        m = cfg.monitor
        self.every = m.knn_every_steps or (
            max(1, round(m.knn_every_epochs * steps_per_epoch)) if m.knn_every_epochs else 0
        )
        self.cfg, self.device = cfg, device
        self._splits: dict[str, Dataset] | None = None
        self._classes = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, step: int, final: bool) -> bool:
        """Every `every` steps and at the end when on; at the end anyway with monitor.knn_at_end."""
        return (self.enabled and (step % self.every == 0 or final)) or (final and self.cfg.monitor.knn_at_end)

    def _datasets(self) -> dict[str, Dataset]:
        """Bank and query subsets, built on first use (the run may never reach a monitor step)."""
        if self._splits is None:
            m, run_cfg = self.cfg.monitor, self.cfg
            data = EvalDataConfig(**(to_dict(run_cfg.data) | {"limit": 0, "val_root": m.val_root}))
            eval_cfg = EvalConfig(data=data)
            transform = eval_transform(run_cfg.crops.global_size)
            self._splits = {}
            for split, n in (("train", m.knn_train), ("test", m.knn_test)):
                base = eval_dataset(eval_cfg, run_cfg, split)
                self._splits[split] = TransformedDataset(evenly_spaced_subset(base, n), transform)
                if split == "test":
                    self._classes = num_classes(base)
        return self._splits

    def _features(self, backbone: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        dist = distributed.info()
        mine = list(range(dist.rank, len(dataset), dist.world_size))
        precision = self.cfg.train.precision
        autocast = {"fp32": None, "bf16": torch.bfloat16}.get(precision, torch.float16)
        features, label_tensor = encode_dataset(
            Subset(dataset, mine),
            lambda images: cls_features(backbone, images),
            batch_size=max(64, self.cfg.optim.batch_size),
            workers=min(self.cfg.train.workers, MAX_WORKERS),
            device=self.device,
            autocast_dtype=autocast,
        )
        if dist.world_size > 1:
            # Rank r holds images r, r + world, ...: interleave the gathered parts back into order.
            parts = distributed.all_gather_object((mine, features, label_tensor))
            order = torch.tensor([i for part in parts for i in part[0]]).argsort()
            features = torch.cat([p[1] for p in parts])[order]
            label_tensor = torch.cat([p[2] for p in parts])[order]
        return features, label_tensor

    def __call__(self, teacher_backbone: nn.Module, step: int) -> MonitorResult:
        started = time.monotonic()
        splits = self._datasets()
        was_training = teacher_backbone.training
        teacher_backbone.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            # The data loader draws its base seed from the global generator: keep training's stream.
            with torch.random.fork_rng(devices=devices):
                bank, bank_labels = self._features(teacher_backbone, splits["train"])
                queries, query_labels = self._features(teacher_backbone, splits["test"])
        finally:
            teacher_backbone.train(was_training)
        k = self.cfg.monitor.knn_k
        classes = max(self._classes, int(bank_labels.max()) + 1, int(query_labels.max()) + 1)
        top1, top5 = knn_accuracy(
            bank.to(self.device), bank_labels.to(self.device), queries.to(self.device),
            query_labels.to(self.device), [k], TEMPERATURE, classes,
        )  # fmt: skip
        result = MonitorResult(top1[k], top5[k], time.monotonic() - started)
        log.info(
            "k-NN monitor at step %d: top-1 %.2f top-5 %.2f (k=%d, %d bank / %d queries, %.1f s)",
            step, result.top1, result.top5, k, len(bank), len(queries), result.seconds,
        )  # fmt: skip
        return result
