"""webdataset shards on local paths and on the S3 server: pack Fashion-MNIST, read every image exactly
once per epoch across ranks and workers, resume mid-epoch exactly, train and evaluate on them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from dino.config.schema import CropsConfig
from dino.data import shards
from dino.data.datasets import FashionMNIST
from dino.io import storage
from dino.method.augment import MultiCropAugment
from tests.integration.cli import TINY, dinolab
from tests.parts import FASHION_MNIST_ROOT

pytestmark = pytest.mark.usefixtures("fashion_mnist")
N = 512


def _pack_cli(out: str) -> str:
    result = dinolab("data", "pack", "fashion_mnist:train", out, "--limit", str(N), "--shard-size", "48")
    assert result.returncode == 0, result.stderr
    assert f"packed {N} images of 10 classes into 11 shards" in result.stdout
    return out


@pytest.fixture
def packed(store_root):
    """512 Fashion-MNIST images in 11 shards of 48 (the last one 32), packed in this process."""
    out = storage.join(store_root, "fm-shards")
    dataset = torch.utils.data.Subset(FashionMNIST(str(FASHION_MNIST_ROOT), "train"), range(N))
    index = shards.pack(dataset, out, shard_size=48)
    assert [s["count"] for s in index["shards"]] == [48] * 10 + [32]
    return out


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def _epoch_images(root: str, epoch: int, batch: int, world: int, workers: int) -> Counter:
    spe = shards.steps_per_epoch(N, batch, world)
    seen: Counter = Counter()
    for rank in range(world):
        stream = shards.ShardStream(shards.ShardedDataset(root), lambda image: [image], 0, batch,
                                    epoch * spe, (epoch + 1) * spe, rank, world)  # fmt: skip
        for crops, _labels in DataLoader(stream, batch_size=None, num_workers=workers):
            seen.update(_digest(image) for image in crops[0])
    return seen


def test_every_image_exactly_once_per_epoch_across_two_ranks_and_two_workers(packed):
    originals = FashionMNIST(str(FASHION_MNIST_ROOT), "train")
    expected = Counter(_digest(originals[i][0]) for i in range(N))
    # batch 16 x 2 ranks x 8 streams divides 512: every image is used, every epoch
    assert _epoch_images(packed, 0, 16, 2, 2) == expected
    assert _epoch_images(packed, 1, 16, 2, 2) == expected


def test_an_epoch_reads_each_shard_about_once(packed):
    """Streams are contiguous: one process reading a whole epoch fetches each shard once, plus the
    shards cut by a stream boundary (at most one per boundary)."""
    dataset = shards.ShardedDataset(packed)
    stream = shards.ShardStream(dataset, lambda image: [image], 0, 16, 0, shards.steps_per_epoch(N, 16, 1))
    stream.shards.cache_shards = 2 * shards.STREAMS
    for step in range(len(stream)):
        for position in stream.batch_positions(step):
            dataset.sample(position)
    assert dataset.num_shards <= dataset.shard_reads <= dataset.num_shards + shards.STREAMS - 1


def test_a_stream_resumed_mid_epoch_yields_the_same_batches(packed):
    crops = CropsConfig(global_size=32, local_size=16, num_local=2)

    def batches(start: int, workers: int) -> list:
        stream = shards.ShardStream(shards.ShardedDataset(packed), MultiCropAugment(crops), 3, 8, start, 70)
        return list(DataLoader(stream, batch_size=None, num_workers=workers))

    full, resumed = batches(0, 2), batches(37, 2)  # 37: mid-epoch (64 steps per epoch), odd worker offset
    assert len(full) == 70 and len(resumed) == 33
    for (a_crops, a_labels), (b_crops, b_labels) in zip(full[37:], resumed, strict=True):
        assert torch.equal(a_labels, b_labels)
        assert all(torch.equal(x, y) for x, y in zip(a_crops, b_crops, strict=True))
    single = batches(60, 0)  # the number of workers does not change the data either
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(full[60:], single, strict=True))


@pytest.mark.slow
@pytest.mark.heavy
def test_pack_train_and_evaluate_on_shards(store_root):
    packed = _pack_cli(storage.join(store_root, "cli-shards"))
    again = dinolab("data", "pack", "fashion_mnist:train", packed, "--limit", "8")
    assert again.returncode == 2 and "already holds a packed dataset" in again.stderr  # nothing overwritten
    run_dir = storage.join(store_root, "run")
    train = dinolab("train", *TINY, "data=webdataset", f"data.root={packed}", "optim.batch_size=16",
                    "optim.epochs=1", "train.workers=2", f"run.dir={run_dir}")  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "finished: step 32/32" in train.stdout
    knn = dinolab("eval", "knn", f"run.dir={run_dir}", "data=webdataset", f"data.root={packed}",
                  f"data.val_root={packed}", "knn.k=[5]", "device=cpu")  # fmt: skip
    assert knn.returncode == 0, knn.stderr
    (name,) = storage.listdir(storage.join(run_dir, "eval", "knn"))
    result = json.loads(storage.read_text(storage.join(run_dir, "eval", "knn", name)))
    assert result["num_train"] == N and result["data"]["name"] == "webdataset"
    assert result["top1"]["5"] > 30  # the query set is the bank itself: far above chance (10 %)


def test_a_decode_only_stream_feeds_the_batched_augmentation(packed):
    """data.augment_device=gpu: the stream yields decoded uint8 images (padded batch, sizes, labels),
    the same images and labels the per-image path augments."""
    decoded = shards.ShardStream(shards.ShardedDataset(packed), None, 0, 16, 5, 8)
    identity = shards.ShardStream(shards.ShardedDataset(packed), lambda image: [image], 0, 16, 5, 8)
    for (batch, sizes, labels), (crops, labels_ref) in zip(
        DataLoader(decoded, batch_size=None, num_workers=2),
        DataLoader(identity, batch_size=None),
        strict=True,
    ):
        assert batch.dtype == torch.uint8 and batch.shape == (16, 3, 28, 28)
        assert sizes.tolist() == [[28, 28]] * 16
        assert torch.equal(batch, crops[0]) and torch.equal(labels, labels_ref)
