"""The evaluation data: the train (bank) and test (queries) splits, the eval transform, subsets.

Every evaluation reads images through here: k-NN and the linear probe (`features.split_features`,
`linear`), and the k-NN monitor during pretraining (`monitor`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import InterpolationMode, v2

from dino.config.schema import ConfigError, DinoConfig
from dino.data.datasets import FashionMNIST, ImageFolder, SyntheticDataset
from dino.data.train_data import build_dataset
from dino.eval.config import EvalConfig
from dino.method.augment import IMAGENET_MEAN, IMAGENET_STD

# Seed offset of the synthetic "test" split: the same generator with another seed gives other
# images of the same classes (the image of (seed, index) is drawn from seed * 1_000_003 + index).
SYNTHETIC_TEST_SEED_OFFSET = 1


def validate_data(cfg: EvalConfig) -> None:
    if cfg.data.name in ("imagefolder", "webdataset") and not cfg.data.val_root:
        raise ConfigError(
            f"data={cfg.data.name} needs data.val_root=<{'folder with one sub-folder per class' if cfg.data.name == 'imagefolder' else 'packed validation images'}> for the test split"
        )


def eval_dataset(cfg: EvalConfig, run_cfg: DinoConfig, split: str) -> Dataset:
    """The `train` (bank) or `test` (queries) split of the evaluation data, uint8 images + labels.

    fashion_mnist: its own train/test files. imagefolder: data.root / data.val_root. synthetic: the
    run's generator for train; for test the same generator with seed + 1 (other images, same classes).
    """
    seed = run_cfg.train.seed
    if cfg.data.name == "synthetic":
        offset = SYNTHETIC_TEST_SEED_OFFSET if split == "test" else 0
        return build_dataset(cfg.data, seed + offset)
    if cfg.data.name == "imagefolder":
        root = cfg.data.root if split == "train" else cfg.data.val_root
        return ImageFolder(root, cfg.data.max_decode_size, cfg.data.on_bad_image)
    if cfg.data.name == "webdataset":
        from dino.data.shards import ShardedDataset

        return ShardedDataset(
            cfg.data.root if split == "train" else cfg.data.val_root,
            cfg.data.max_decode_size,
            on_bad_image=cfg.data.on_bad_image,
        )
    return build_dataset(cfg.data, seed, split=split)


def num_classes(dataset: Dataset) -> int:
    if isinstance(dataset, SyntheticDataset):
        return dataset.num_classes
    if isinstance(dataset, FashionMNIST):
        return int(dataset.labels.max()) + 1
    if isinstance(dataset, ImageFolder) or getattr(dataset, "classes", None):
        return len(dataset.classes)
    return max(int(dataset[i][1]) for i in range(len(dataset))) + 1


def image_size(cfg: EvalConfig, run_cfg: DinoConfig) -> int:
    size = cfg.image_size or run_cfg.crops.global_size
    if cfg.baseline != "pixels" and size % run_cfg.model.patch_size:
        raise ConfigError(
            f"image_size={size} must be a multiple of model.patch_size={run_cfg.model.patch_size}"
        )
    return size


def eval_transform(size: int) -> v2.Compose:
    """Resize the shorter side to size * 256/224, center-crop `size`, ImageNet normalisation."""
    return v2.Compose(
        [
            v2.Resize(round(size * 256 / 224), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TransformedDataset(Dataset):
    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def evenly_spaced(total: int, n: int) -> list[int]:
    """n indices spread over range(total) (all of them when n >= total or n == 0): every class of a
    folder sorted by class, unlike the first n."""
    if n <= 0 or n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def evenly_spaced_subset(dataset: Dataset, n: int) -> Dataset:
    """`dataset` itself when n is 0 or covers it, else its n evenly spaced images."""
    if n <= 0 or n >= len(dataset):
        return dataset
    return Subset(dataset, evenly_spaced(len(dataset), n))
