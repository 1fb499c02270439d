import pytest
import torch
from torch.utils.data import DataLoader

from dino.data.datasets import (
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolder,
    MultiCropDataset,
    RunBatchSampler,
    SyntheticDataset,
)
from dino.data.train_data import build_dataset
from dino.method.augment import MultiCropAugment


def test_augmentation_makes_two_global_and_n_local_crops(tiny_cfg):
    cfg = tiny_cfg("crops.num_local=5")
    crops = MultiCropAugment(cfg.crops)(SyntheticDataset(4, 40, 10)[0][0])
    assert len(crops) == 2 + 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 5
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_augmentation_is_a_function_of_seed_epoch_index(tiny_cfg):
    cfg = tiny_cfg()
    ds = MultiCropDataset(SyntheticDataset(16, 32, 4), MultiCropAugment(cfg.crops), seed=3)
    a, b = ds[(0, 5)][0], ds[(0, 5)][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other_epoch = ds[(1, 5)][0]
    assert not all(torch.equal(x, y) for x, y in zip(a, other_epoch, strict=True))
    # The global RNG is neither used nor advanced by augmentation.
    before = torch.get_rng_state()
    ds[(0, 1)]
    assert torch.equal(before, torch.get_rng_state())


def test_batches_do_not_depend_on_the_number_of_workers(tiny_cfg):
    cfg = tiny_cfg()
    ds = MultiCropDataset(SyntheticDataset(32, 32, 4), MultiCropAugment(cfg.crops), seed=0)

    def batches(workers):
        sampler = RunBatchSampler(32, 4, seed=0, start_step=3, end_step=11)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return [torch.cat([c.flatten(1) for c in crops], 1) for crops, _ in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == 8
    assert all(torch.equal(x, y) for x, y in zip(zero, two, strict=True))


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    full = list(RunBatchSampler(20, 3, seed=1, start_step=0, end_step=12))
    assert len(full) == 12  # 6 steps per epoch (18 of 20 samples), 2 epochs
    assert list(RunBatchSampler(20, 3, seed=1, start_step=5, end_step=12)) == full[5:]
    epoch0 = [i for batch in full[:6] for _, i in batch]
    assert len(set(epoch0)) == 18
    # Two ranks with half the batch each see, together, exactly the single-process global batch.
    single = list(RunBatchSampler(20, 6, seed=1, start_step=0, end_step=3))
    ranks = [
        list(RunBatchSampler(20, 3, seed=1, start_step=0, end_step=3, rank=r, world_size=2)) for r in (0, 1)
    ]
    for i in range(3):
        assert sorted(ranks[0][i] + ranks[1][i]) == sorted(single[i])


def test_missing_fashion_mnist_names_the_path_and_the_package(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        FashionMNIST(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_missing_or_empty_imagefolder_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"data.root={tmp_path / 'x'} is not a folder"):
        ImageFolder(str(tmp_path / "x"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images under data.root"):
        ImageFolder(str(tmp_path / "empty"))


def test_imagefolder_reads_class_folders(tmp_path):
    import numpy as np
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.random.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path), max_decode_size=10)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    image, label = ds[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12) and label == 1


def test_fashion_mnist_from_the_debian_package(tiny_cfg, fashion_mnist):
    cfg = tiny_cfg("data=fashion_mnist")
    train, test = build_dataset(cfg.data), build_dataset(cfg.data, split="test")
    assert len(train) == 60000 and len(test) == 10000
    image, label = train[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8 and 0 <= label < 10
