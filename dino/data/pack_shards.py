"""Write a dataset as webdataset shards (the layout dino/data/shards.py reads): `pack`."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from dino.data.datasets import decode_image
from dino.data.shards import FORMAT, INDEX, shard_name
from dino.io import storage

# Side at which `pack` test-decodes a folder's images: JPEG draft mode decodes at 1/8 scale, several
# times cheaper than full size, and still reads every byte (a file cut short fails).
CHECK_DECODE_SIZE = 64


def _encoded(dataset: Dataset, index: int) -> tuple[str, bytes, int] | None:
    """(extension, encoded image, label): a folder's files as they are (None for an unreadable one
    under --on-bad-image skip), tensors as PNG."""
    from PIL import Image

    from dino.data.datasets import ImageFolder

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
