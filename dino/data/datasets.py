"""Datasets (synthetic, fashion_mnist, imagefolder) and the deterministic sampler (the loader: dino/data/train_data.py).

Every base dataset returns (uint8 image [3, H, W], label). `MultiCropDataset` is indexed by
(epoch, index) and seeds the augmentation from (seed, epoch, index), so a sample's crops depend on
nothing else: not on the number of workers, not on where a run was resumed. The order of an epoch
is a permutation drawn from (seed, epoch); `RunBatchSampler` starts at any global step, which makes
the data position of a checkpoint just its step.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dino.data.bad_images import BadImages
from dino.io import storage
from dino.method.augment import MultiCropAugment, sample_seed

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the config says; the message says where we looked."""


class SyntheticDataset(Dataset):
    """Deterministic images from (seed, index): class-dependent stripes over smooth random colour."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int = 0) -> None:
        self.num_samples, self.image_size, self.num_classes, self.seed = (
            num_samples,
            image_size,
            num_classes,
            seed,
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size = self.image_size
        colour = torch.rand(3, 4, 4, generator=gen)
        base = torch.nn.functional.interpolate(colour[None], size=(size, size), mode="bilinear")[0]
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        angle = torch.pi * label / self.num_classes
        freq = 2 * torch.pi * (2 + label) / size
        phase = torch.rand(1, generator=gen) * 2 * torch.pi
        stripes = 0.5 + 0.5 * torch.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        image = 0.5 * base + 0.5 * stripes[None]
        return (image * 255).round().clamp(0, 255).to(torch.uint8), label


def _read_idx_gz(path: str) -> np.ndarray:
    with storage.open_file(path, "rb") as raw, gzip.open(raw) as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the idx files of Debian's `dataset-fashion-mnist` (grey, replicated to RGB)."""

    def __init__(self, root: str, split: str = "train") -> None:
        split = "test" if split in ("val", "test") else split
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"data.split={split!r} is not allowed for fashion_mnist; choose train or test")
        images_name, labels_name = FASHION_MNIST_FILES[split]
        images_path, labels_path = storage.join(root, images_name), storage.join(root, labels_name)
        missing = [p for p in (images_path, labels_path) if not storage.exists(p)]
        if missing:
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found: looked for {', '.join(missing)} (data.root={root}). "
                "Install Debian's package with `apt-get install dataset-fashion-mnist` "
                "or set data.root to the folder holding the idx .gz files."
            )
        self.images = torch.from_numpy(_read_idx_gz(images_path).copy())
        self.labels = torch.from_numpy(_read_idx_gz(labels_path).astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].expand(3, -1, -1).contiguous(), int(self.labels[index])


class ImageFolder(Dataset):
    """<root>/<class>/<image> with classes in sorted order; images decoded to uint8 RGB tensors."""

    def __init__(
        self,
        root: str,
        max_decode_size: int = 0,
        on_bad_image: str = "skip",
        option: str = "data.on_bad_image",
    ) -> None:
        if not storage.isdir(root):
            raise DatasetNotFoundError(
                f"data.root={root} is not a folder: data=imagefolder expects <root>/<class>/<image>"
            )
        # One listing of the whole tree, made once when the dataset is built; loader workers inherit it.
        files = [f.split("/", 1) for f in storage.find(root) if f.count("/") == 1]
        self.classes = sorted({cls for cls, _ in files})
        labels = {cls: i for i, cls in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [
            (storage.join(root, cls, name), labels[cls])
            for cls, name in files
            if name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not self.samples:
            raise DatasetNotFoundError(
                f"no images under data.root={root}: expected <root>/<class>/<image> with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
        self.max_decode_size = max_decode_size
        self.bad_images = BadImages(on_bad_image, option)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.bad_images.read(index, len(self), self._load, lambda i: self.samples[i][0])

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return decode_image(storage.read_bytes(path), self.max_decode_size), label


def decode_image(data: bytes, max_decode_size: int = 0) -> torch.Tensor:
    """Encoded image -> uint8 RGB [3, H, W]; shorter side capped at `max_decode_size` (0: as is)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if max_decode_size:
            # JPEG draft mode decodes at a reduced scale directly: much cheaper than resizing after.
            img.draft("RGB", (max_decode_size, max_decode_size))
            scale = max_decode_size / min(img.size)
            if scale < 1:
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class MultiCropDataset(Dataset):
    """(epoch, index) -> (list of crops, label) with augmentation seeded from (seed, epoch, index)."""

    def __init__(self, base: Dataset, augment: MultiCropAugment, seed: int) -> None:
        self.base, self.augment, self.seed = base, augment, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        epoch, index = key
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            crops = self.augment(image)
        return crops, label


class DecodedDataset(Dataset):
    """(epoch, index) -> (uint8 image, label): the loader only decodes, augmentation runs batched on the
    training device (`data.augment_device=gpu`)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.base[key[1]]


def pad_collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded images of different sizes -> (uint8 [B, 3, Hmax, Wmax] zero-padded, sizes [B, 2], labels)."""
    from dino.method.batch_augment import pad_batch

    batch, sizes = pad_batch([image for image, _ in samples])
    return batch, sizes, torch.tensor([label for _, label in samples])


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's order (the folder's permutation, the shards' order)."""
    return seed * 100_003 + epoch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


class RankSteps:
    """One rank's share of the global steps [start_step, end_step), epochs of `steps_per_epoch` batches
    of `batch_size` per rank: what the folder's batch sampler and the shards' stream have in common.
    `too_few` is the error when the data do not hold one step."""

    def __init__(
        self,
        steps_per_epoch: int,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int,
        world_size: int,
        too_few: str,
    ) -> None:
        self.steps_per_epoch, self.batch_size, self.seed = steps_per_epoch, batch_size, seed
        self.start_step, self.end_step, self.rank, self.world_size = start_step, end_step, rank, world_size
        if steps_per_epoch == 0:
            raise ValueError(too_few)

    def __len__(self) -> int:
        return max(self.end_step - self.start_step, 0)


class RunBatchSampler(RankSteps, Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) for one rank from global step `start_step` to `end_step`.

    Epoch e uses `epoch_permutation(n, seed, e)` truncated to whole global batches; rank r takes every
    world-th sample, so the union of the ranks' batch i is the single-process batch i of the same
    global size (a DDP run sees the data a single process would).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        too_few = (
            f"{num_samples} images are fewer than one global batch "
            f"(optim.batch_size={batch_size} x {world_size} devices)"
        )
        spe = steps_per_epoch(num_samples, batch_size, world_size)
        super().__init__(spe, batch_size, seed, start_step, end_step, rank, world_size, too_few)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while step < self.end_step:
            epoch, first = divmod(step, self.steps_per_epoch)
            used = self.steps_per_epoch * self.batch_size * self.world_size
            mine = epoch_permutation(self.num_samples, self.seed, epoch)[:used][self.rank :: self.world_size]
            for i in range(first, self.steps_per_epoch):
                if step >= self.end_step:
                    return
                yield [(epoch, int(j)) for j in mine[i * self.batch_size : (i + 1) * self.batch_size]]
                step += 1
