"""Images each stage of a run processes: pretraining, epochs x the dataset as the train loop counts
steps; k-NN, bank + queries once; linear, the test split once plus the train split every epoch. One
dataset size per data root.

A dataset's size is counted where `plan` runs (an image folder's files, a shard index). Where it
cannot be (ImageNet is not mounted on a laptop), `data.num_images` gives it: N for data.root, or
{train: N, val: M} adding data.val_root, the evaluations' test split. The count on disk is the truth:
a `num_images` that disagrees with it is reported in a note and not used. A size known from neither
is unknown (`?`), and the reason names the key that prices it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dino.config.schema import DataConfig, DinoConfig
from dino.io import storage

FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
NUM_IMAGES_FORM = "an integer or {train: N, val: M}"


@dataclass(frozen=True)
class Size:
    """A number of images, or None with `why` (what is missing and the key that fixes it); `notes`:
    what the plan should say about where the number comes from."""

    images: int | None
    why: str = ""
    notes: tuple[str, ...] = ()


_SIZES: dict[tuple, Size] = {}


def dataset_size(data: DataConfig, split: str) -> Size:
    """Images of a split, read once per data root: counted on disk, else `data.num_images`."""
    val = split != "train" and bool(getattr(data, "val_root", ""))
    root = data.val_root if val else data.root
    given = getattr(data, "num_images", None)
    if split != "train" and not val:
        given = None  # N counts the train split: a test split read from data.root is not N's to price
    key = (data.name, root, split, data.num_samples, repr(given))
    if key not in _SIZES:
        _SIZES[key] = _size(data, root, split, "val" if val else "train", given)
    size = _SIZES[key]
    if size.images is not None and split == "train" and data.limit:
        size = dataclasses.replace(size, images=min(size.images, data.limit))
    return size


def _size(data: DataConfig, root: str, split: str, part: str, given: Any) -> Size:
    root_key = "data.val_root" if part == "val" else "data.root"
    declared, problem = _declared(given, part)
    counted = _count(data.name, root, split, data.num_samples)
    if counted is not None:
        if problem:
            return Size(
                counted, notes=(f"{problem}: ignored, {root_key} {root} holds {counted:,} images here",)
            )
        if declared is not None and declared != counted:
            return Size(counted, notes=(
                f"{_key(part, given)}={declared:,} but {root_key} {root} holds {counted:,} images here: "
                f"the count on disk is used",
            ))  # fmt: skip
        return Size(counted)
    where = f"{root_key} {root!r} is not readable here, so its size is unknown"
    if problem:
        return Size(None, f"{where}, and {problem}")
    if declared is None:
        fix = "data.num_images=<N>" if part == "train" else "data.num_images={train: <N>, val: <M>}"
        return Size(None, f"{where}: set {fix} to price it")
    return Size(
        declared, notes=(f"{root_key} {root} is not readable here: {_key(part, given)}={declared:,} used",)
    )


def _key(part: str, given: Any) -> str:
    return f"data.num_images.{part}" if isinstance(given, dict) else "data.num_images"


def _declared(given: Any, part: str) -> tuple[int | None, str]:
    """(the images `data.num_images` declares for `part` (train: data.root, val: data.val_root), or
    None; what is wrong with the value, if anything)."""
    if given is None:
        return None, ""
    parts = given if isinstance(given, dict) else {"train": given}
    if set(parts) - {"train", "val"} or not all(_count_like(v) for v in parts.values()):
        return None, f"data.num_images={given!r} is not {NUM_IMAGES_FORM} (positive counts)"
    return parts.get(part), ""


def _count_like(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _count(name: str, root: str, split: str, num_samples: int) -> int | None:
    try:
        if name == "synthetic":
            return num_samples
        if name == "fashion_mnist":
            return FASHION_MNIST_SIZES["test" if split in ("val", "test") else "train"]
        if name == "webdataset":
            from dino.data.shards import read_index

            return int(read_index(root)["num_samples"])
        if name == "imagefolder" and root and storage.isdir(root):
            from dino.data.datasets import IMAGE_EXTENSIONS

            return sum(
                1 for f in storage.find(root) if f.count("/") == 1 and f.lower().endswith(IMAGE_EXTENSIONS)
            )
    except Exception:  # noqa: BLE001 - unreadable here: the estimate says "unknown"
        return None
    return None


def pretrain_images(cfg: DinoConfig, world: int) -> Size:
    """Images the run's pretraining processes, counted as the train loop counts its steps."""
    size = dataset_size(cfg.data, "train")
    if size.images is None:
        return size
    spe = size.images // (cfg.optim.batch_size * world)
    total = cfg.optim.epochs * spe
    steps = min(total, cfg.train.max_steps or total)
    return dataclasses.replace(size, images=steps * cfg.optim.batch_size * world)


def _eval_size(data: Any, split: str) -> Size:
    """A split as dino/eval/features.py `eval_dataset` reads it: data.limit cuts the train split of
    fashion_mnist and both splits of synthetic data (one generator), never an image folder's."""
    if data.name == "synthetic":
        return Size(min(data.num_samples, data.limit or data.num_samples))
    if data.name == "fashion_mnist":
        return dataset_size(data, split)
    return dataset_size(dataclasses.replace(data, limit=0), split)


def eval_images(protocol: str, ecfg: Any) -> Size:
    train, test = _eval_size(ecfg.data, "train"), _eval_size(ecfg.data, "test")
    notes = train.notes + tuple(n for n in test.notes if n not in train.notes)
    if train.images is None or test.images is None:
        return Size(None, train.why or test.why, notes)
    if protocol == "knn":
        images = min(train.images, ecfg.knn.max_train or train.images) + min(
            test.images, ecfg.knn.max_test or test.images
        )
        return Size(images, notes=notes)
    lin = ecfg.linear
    epochs = min(lin.epochs, lin.max_epochs or lin.epochs)
    images = min(test.images, lin.max_test or test.images) + epochs * min(
        train.images, lin.max_train or train.images
    )
    return Size(images, notes=notes)
