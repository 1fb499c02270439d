"""Datasets as webdataset shards: tar files of `<key>.<ext>` image + `<key>.cls` label, plus `index.json`.

Object stores are slow at millions of small GETs, fast at large sequential ones. `pack()`
(`dinolab data pack`, at the end of this module) writes a dataset as shards of `shard_size` images in a seeded random order
(so a shard mixes classes) and the index last (the dataset exists once its index does). Reading uses the webdataset library's tar
iterator; a shard is fetched whole with one GET.

Training order, designed for exact resume and disjoint, sequential reads:
- epoch e: the shards in a permutation drawn from (seed, e), each shard's images in a permutation drawn
  from (seed, e, shard); concatenated, that is the epoch's sequence;
- rank r owns the r-th contiguous part of the sequence, split into `STREAMS` contiguous streams; the
  rank's batch i is the next batch of stream i mod STREAMS. Steps per epoch are a multiple of
  STREAMS, so every part and stream holds whole batches (the few images left over change every epoch);
- DataLoader worker w of k produces batches w, w+k, ... (the order DataLoader hands them back in), so
  with k dividing STREAMS each worker reads only its own streams, each shard once or at a boundary twice.
Batch i depends only on (seed, epoch, i), so a run resumed at any step sees the batches an
uninterrupted run sees, whatever the number of workers. Crops are seeded by the image's original
index, exactly as for the folder it was packed from.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from dino.data.bad_images import BadImages
from dino.data.datasets import (
    DatasetNotFoundError,
    ImageFolder,
    RankSteps,
    decode_image,
    epoch_seed,
    pad_collate,
)
from dino.io import storage
from dino.method.augment import sample_seed

INDEX = "index.json"
STREAMS = 8
FORMAT = "dinolab-webdataset-1"


@dataclass(frozen=True)
class Sample:
    key: str  # the image's index in the packed dataset (9 digits)
    ext: str
    data: bytes
    label: int


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_index(root: str) -> dict:
    path = storage.join(root, INDEX)
    if not storage.exists(path):
        raise DatasetNotFoundError(
            f"no packed dataset at data.root={root}: looked for {path}. Pack an image folder with "
            f"`dinolab data pack <folder> {root}` (an interrupted pack has shards but no index)."
        )
    index = json.loads(storage.read_text(path))
    if index.get("format") != FORMAT:
        raise DatasetNotFoundError(f"{path} is not a dinolab shard index (format {index.get('format')!r})")
    return index


def read_shard(root: str, name: str) -> list[Sample]:
    """All samples of one shard, in tar order (one GET, then the webdataset tar iterator)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    url = storage.join(root, name)
    files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(storage.read_bytes(url))))
    samples = []
    for group in group_by_keys(files):
        ext = next(k for k in group if not k.startswith("__") and k != "cls")
        samples.append(Sample(group["__key__"], ext, group[ext], int(group["cls"])))
    return samples


class ShardedDataset(Dataset):
    """Packed images by position in pack order (evaluation reads them in that order, shard by shard).

    Keeps the last `cache_shards` shards in memory, so sequential access reads each shard once.
    """

    def __init__(
        self, root: str, max_decode_size: int = 0, cache_shards: int = 2, on_bad_image: str = "skip"
    ) -> None:
        self.root, self.max_decode_size, self.cache_shards = root, max_decode_size, cache_shards
        self.bad_images = BadImages(on_bad_image)
        self.index = read_index(root)
        self.classes = self.index["classes"]
        counts = [s["count"] for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache: OrderedDict[int, list[Sample]] = OrderedDict()
        self.shard_reads = 0  # how many shards were fetched (tests and the benchmark read it)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.index["shards"])

    def shard(self, i: int) -> list[Sample]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        samples = read_shard(self.root, self.index["shards"][i]["name"])
        self.shard_reads += 1
        self._cache[i] = samples
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return samples

    def sample(self, position: int) -> Sample:
        s = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.shard(s)[position - int(self.starts[s])]

    def name(self, position: int) -> str:
        """Where the image at `position` is packed: `<shard URL>:<key>.<ext>`."""
        s = int(np.searchsorted(self.starts, position, side="right")) - 1
        sample = self.sample(position)
        return f"{storage.join(self.root, self.index['shards'][s]['name'])}:{sample.key}.{sample.ext}"

    def decoded(self, position: int) -> tuple[torch.Tensor, Sample]:
        """(image, sample) at `position`, or under data.on_bad_image=skip at the next readable one."""

        def load(p: int) -> tuple[torch.Tensor, Sample]:
            sample = self.sample(p)
            return decode_image(sample.data, self.max_decode_size), sample

        return self.bad_images.read(position, len(self), load, self.name)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        image, sample = self.decoded(position)
        return image, sample.label


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Whole batches per rank and epoch, a multiple of STREAMS."""
    return num_samples // (batch_size * world_size * STREAMS) * STREAMS


class ShardStream(RankSteps, IterableDataset):
    """One rank's batches from global step `start_step` to `end_step`: (collated crops, labels), or with
    `augment=None` the decoded images for batched augmentation (padded batch, sizes, labels)."""

    def __init__(
        self,
        shards: ShardedDataset,
        augment: Callable[[torch.Tensor], list[torch.Tensor]] | None,
        seed: int,
        batch_size: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shards, self.augment = shards, augment
        too_few = (
            f"{len(shards)} packed images are fewer than {STREAMS} global batches "
            f"(optim.batch_size={batch_size} x {world_size} devices x {STREAMS} streams)"
        )
        spe = steps_per_epoch(len(shards), batch_size, world_size)
        super().__init__(spe, batch_size, seed, start_step, end_step, rank, world_size, too_few)
        self._sequence: tuple[int, torch.Tensor] | None = None

    def epoch_sequence(self, epoch: int) -> torch.Tensor:
        """Pack positions of the whole epoch in reading order (shards permuted, images within)."""
        if self._sequence is None or self._sequence[0] != epoch:
            base = epoch_seed(self.seed, epoch)
            shard_order = torch.randperm(
                self.shards.num_shards, generator=torch.Generator().manual_seed(base)
            )
            parts = []
            for s in shard_order.tolist():
                start, stop = int(self.shards.starts[s]), int(self.shards.starts[s + 1])
                gen = torch.Generator().manual_seed(base * 1_000_003 + s)
                parts.append(start + torch.randperm(stop - start, generator=gen))
            self._sequence = (epoch, torch.cat(parts))
        return self._sequence[1]

    def batch_positions(self, step: int) -> list[int]:
        """Pack positions of this rank's batch at global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        per_stream = self.steps_per_epoch // STREAMS * self.batch_size
        stream, t = i % STREAMS, i // STREAMS
        start = self.rank * self.steps_per_epoch * self.batch_size + stream * per_stream + t * self.batch_size
        return self.epoch_sequence(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Each of this worker's streams holds one shard in use and may be crossing into the next.
        self.shards.cache_shards = 2 * max(1, math.ceil(STREAMS / workers))
        for step in range(self.start_step + worker, self.end_step, workers):
            epoch = step // self.steps_per_epoch
            batch = []
            for position in self.batch_positions(step):
                image, sample = self.shards.decoded(position)
                if self.augment is None:  # augmentation happens batched on the device
                    batch.append((image, sample.label))
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, int(sample.key)))
                    crops = self.augment(image)
                batch.append((crops, sample.label))
            if self.augment is None:
                yield pad_collate(batch)
            else:
                yield default_collate(batch)


# --------------------------------------------------------------------------------------------------
# Writing: `dinolab data pack`
# --------------------------------------------------------------------------------------------------
# Side at which `pack` test-decodes a folder's images: JPEG draft mode decodes at 1/8 scale, several
# times cheaper than full size, and still reads every byte (a file cut short fails).
CHECK_DECODE_SIZE = 64


def _encoded(dataset: Dataset, index: int) -> tuple[str, bytes, int] | None:
    """(extension, encoded image, label): a folder's files as they are (None for an unreadable one
    under --on-bad-image skip), tensors as PNG."""
    from PIL import Image

    base, offset = _unwrap(dataset, index)
    if isinstance(base, ImageFolder):
        path, label = base.samples[offset]
        data = storage.read_bytes(path)
        if not base.bad_images.readable(path, lambda: decode_image(data, CHECK_DECODE_SIZE)):
            return None
        ext = path.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg")
        return ext, data, label
    image, label = dataset[index]
    array = image.permute(1, 2, 0).numpy()
    if (array == array[..., :1]).all():
        array = array[..., 0]  # grey stored as grey (Fashion-MNIST)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "png", buffer.getvalue(), int(label)


def pack(
    dataset: Dataset,
    out: str,
    shard_size: int = 1000,
    seed: int = 0,
    classes: list[str] | None = None,
    source: str = "",
    on_shard: Callable[[int, int], None] = lambda done, total: None,
) -> dict:
    """Write `dataset` as shards under `out`; refuses a folder that already holds a packed dataset.
    A folder's unreadable images are left out under `skip` (listed in the index as `skipped`)."""
    import webdataset as wds

    if storage.exists(storage.join(out, INDEX)):
        raise FileExistsError(f"{out} already holds a packed dataset ({INDEX} exists); nothing was written")
    storage.makedirs(out)
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    num_shards = math.ceil(n / shard_size)
    shards, skipped, max_label = [], [], -1
    for s in range(num_shards):
        members = order[s * shard_size : (s + 1) * shard_size]
        buffer, count = io.BytesIO(), 0
        with wds.TarWriter(buffer, encoder=False, mtime=0) as writer:
            for index in members:
                encoded = _encoded(dataset, index)
                if encoded is None:
                    skipped.append(index)
                    continue
                ext, data, label = encoded
                max_label = max(max_label, label)
                writer.write({"__key__": f"{index:09d}", ext: data, "cls": str(label).encode()})
                count += 1
        storage.atomic_write_bytes(storage.join(out, shard_name(s)), buffer.getvalue())
        shards.append({"name": shard_name(s), "count": count, "bytes": buffer.tell()})
        on_shard(s + 1, num_shards)
    index = {"format": FORMAT, "num_samples": n - len(skipped), "seed": seed, "source": source, "classes": classes or [str(c) for c in range(max_label + 1)],
             "shards": shards, "skipped": [_source_name(dataset, i) for i in sorted(skipped)]}  # fmt: skip
    storage.atomic_write_text(storage.join(out, INDEX), json.dumps(index, indent=1))
    return index


def _unwrap(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """(the dataset under a `Subset`, the index there)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset.dataset, dataset.indices[index]
    return dataset, index


def _source_name(dataset: Dataset, index: int) -> str:
    """The file an image folder's image came from."""
    base, offset = _unwrap(dataset, index)
    return base.samples[offset][0]
