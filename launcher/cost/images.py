"""Images each stage of a run processes: pretraining, epochs x the dataset as the train loop counts
steps; k-NN, bank + queries once; linear, the test split once plus the train split every epoch. One
dataset size per data root."""

from __future__ import annotations

import dataclasses
from typing import Any

from dino.config.schema import DataConfig, DinoConfig
from dino.io import storage

FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}

_SIZES: dict[tuple, int | None] = {}


def dataset_size(data: DataConfig, split: str) -> int | None:
    """Images of a split, read once per data root (None when the data is not readable here)."""
    root = data.root if split == "train" else getattr(data, "val_root", "") or data.root
    key = (data.name, root, split, data.num_samples)
    if key not in _SIZES:
        _SIZES[key] = _count(data.name, root, split, data.num_samples)
    size = _SIZES[key]
    if size is not None and split == "train" and data.limit:
        size = min(size, data.limit)
    return size


def _count(name: str, root: str, split: str, num_samples: int) -> int | None:
    try:
        if name == "synthetic":
            return num_samples
        if name == "fashion_mnist":
            return FASHION_MNIST_SIZES["test" if split in ("val", "test") else "train"]
        if name == "webdataset":
            from dino.data.shards import read_index

            return int(read_index(root)["num_samples"])
        if name == "imagefolder" and storage.isdir(root):
            from dino.data.datasets import IMAGE_EXTENSIONS

            return sum(
                1 for f in storage.find(root) if f.count("/") == 1 and f.lower().endswith(IMAGE_EXTENSIONS)
            )
    except Exception:  # noqa: BLE001 - unreadable here: the estimate says "unknown"
        return None
    return None


def pretrain_images(cfg: DinoConfig, world: int) -> int | None:
    """Images the run's pretraining processes, counted as the train loop counts its steps."""
    n = dataset_size(cfg.data, "train")
    if n is None:
        return None
    spe = n // (cfg.optim.batch_size * world)
    total = cfg.optim.epochs * spe
    steps = min(total, cfg.train.max_steps or total)
    return steps * cfg.optim.batch_size * world


def _eval_size(data: Any, split: str) -> int | None:
    """A split as dino/eval/features.py `eval_dataset` reads it: data.limit cuts the train split of
    fashion_mnist and both splits of synthetic data (one generator), never an image folder's."""
    if data.name == "synthetic":
        return min(data.num_samples, data.limit or data.num_samples)
    if data.name == "fashion_mnist":
        return dataset_size(data, split)
    return dataset_size(dataclasses.replace(data, limit=0), split)


def eval_images(protocol: str, ecfg: Any) -> int | None:
    train, test = _eval_size(ecfg.data, "train"), _eval_size(ecfg.data, "test")
    if train is None or test is None:
        return None
    if protocol == "knn":
        return min(train, ecfg.knn.max_train or train) + min(test, ecfg.knn.max_test or test)
    lin = ecfg.linear
    epochs = min(lin.epochs, lin.max_epochs or lin.epochs)
    return min(test, lin.max_test or test) + epochs * min(train, lin.max_train or train)
