"""The training batches of a run: crops on the training device, one batch per global step, whatever
the source (`build_dataset` picks it from the config: folder and synthetic datasets through `data.RunBatchSampler`, webdataset shards through
`shards.ShardStream`) and wherever augmentation runs (per image in the loader workers, or batched on
the training device with `data.augment_device=gpu`). The loop only iterates `TrainData.batches`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dino.config.schema import DataConfig, DinoConfig
from dino.data import bad_images, shards
from dino.data import datasets as data
from dino.method.augment import MultiCropAugment, sample_seed
from dino.method.batch_augment import BatchMultiCrop

log = logging.getLogger("dino.train")


def augment_on_device(cfg: DinoConfig, device: torch.device) -> bool:
    """data.augment_device: gpu = batched on the training device; auto = that when it is a GPU."""
    return cfg.data.augment_device == "gpu" or (cfg.data.augment_device == "auto" and device.type == "cuda")


def build_dataset(source: DataConfig, seed: int = 0, split: str | None = None) -> Dataset:
    """The configured dataset; with `data.limit` only its first N images (pretraining split only)."""
    split = split or source.split
    if source.name == "synthetic":
        dataset: Dataset = data.SyntheticDataset(
            source.num_samples, source.image_size, source.num_classes, seed
        )
    elif source.name == "fashion_mnist":
        dataset = data.FashionMNIST(source.root, split)
    elif source.name == "imagefolder":
        dataset = data.ImageFolder(source.root, source.max_decode_size, source.on_bad_image)
    elif source.name == "webdataset":
        dataset = shards.ShardedDataset(source.root, source.max_decode_size, on_bad_image=source.on_bad_image)
    else:
        raise ValueError(f"data.name={source.name!r} is unknown")
    if source.limit and split == source.split and source.limit < len(dataset):
        dataset = Subset(dataset, range(source.limit))
    return dataset


@dataclass
class TrainData:
    cfg: DinoConfig
    device: torch.device
    base: Dataset  # the images (a ShardedDataset for data=webdataset)
    dataset: data.MultiCropDataset | data.DecodedDataset  # what the folder's loader indexes
    batch_augment: BatchMultiCrop | None  # None: crops are made per image in the loader workers
    steps_per_epoch: int  # 0: fewer images than one global batch

    @classmethod
    def open(cls, cfg: DinoConfig, device: torch.device, world_size: int) -> TrainData:
        base = build_dataset(cfg.data, cfg.train.seed)
        if augment_on_device(cfg, device):
            if cfg.data.name in ("imagefolder", "webdataset") and not cfg.data.max_decode_size:
                log.warning(
                    "data.augment_device=gpu decodes images at full size and pads each batch to its largest "
                    "image; set data.max_decode_size (e.g. 512, the shorter side) to bound memory and transfer"
                )
            dataset, batch_augment = data.DecodedDataset(base), BatchMultiCrop(cfg.crops)
        else:
            dataset = data.MultiCropDataset(base, MultiCropAugment(cfg.crops), cfg.train.seed)
            batch_augment = None
        spe = (shards.steps_per_epoch if cls._sharded(base) else data.steps_per_epoch)(
            len(dataset), cfg.optim.batch_size, world_size
        )
        return cls(cfg, device, base, dataset, batch_augment, spe)

    @staticmethod
    def _sharded(base: Dataset) -> bool:
        return isinstance(base, shards.ShardedDataset)

    @property
    def bad(self) -> bad_images.BadImages | None:
        """Image files' reader: unreadable ones are skipped (counted) or fail the run; None: no files."""
        return bad_images.of(self.base)

    def describe(self) -> str:
        if self.batch_augment is not None:
            return f"batched on {self.device.type} (loader workers only decode)"
        return "per image in the loader workers"

    def loader(self, start_step: int, end_step: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The loader of one rank's batches at global steps [start_step, end_step), before augmentation
        on the device."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        seed, batch, workers = cfg.train.seed, cfg.optim.batch_size, cfg.train.workers
        if self._sharded(self.base):
            augment = None if self.batch_augment is not None else self.dataset.augment
            stream = shards.ShardStream(
                self.base, augment, seed, batch, start_step, end_step, rank, world_size
            )
            return _shard_loader(stream, workers, pin)
        sampler = data.RunBatchSampler(len(self.dataset), batch, seed, start_step, end_step, rank, world_size)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=data.pad_collate if self.batch_augment is not None else None,
            pin_memory=pin,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            # A private generator: building the loader must not consume the global RNG, or a resumed
            # run's drop-path randomness would differ from an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )

    def batches(
        self, start_step: int, end_step: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[list[torch.Tensor]]:
        """The crops of each global step from `start_step`, on the training device."""
        for step, item in enumerate(self.loader(start_step, end_step, rank, world_size), start_step):
            if self.batch_augment is None:
                yield [c.to(self.device, non_blocking=True) for c in item[0]]
                continue
            # Crop parameters from (seed, step, rank) alone: exact resume, any number of workers.
            gen = torch.Generator().manual_seed(sample_seed(self.cfg.train.seed, step, rank))
            yield self.batch_augment(item[0].to(self.device, non_blocking=True), item[1], gen)


def _shard_loader(stream: shards.ShardStream, workers: int, pin_memory: bool) -> DataLoader:
    if workers and shards.STREAMS % workers:
        logging.getLogger("dino.shards").warning(
            "train.workers=%d does not divide the %d shard streams: workers share streams and read "
            "some shards more than once (same batches, more traffic); use 1, 2, 4 or 8", workers, shards.STREAMS,
        )  # fmt: skip
    return DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )
