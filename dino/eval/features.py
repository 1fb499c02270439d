"""What every evaluation shares: the checkpoint it reads, the eval transform, and cached features.

`resolve` turns overrides into an `EvalConfig` and a `Target`: the frozen network being evaluated
(the teacher backbone of a complete checkpoint, or a baseline: the same architecture randomly
initialised, or raw pixels) and the provenance every result records (checkpoint path, step, config
hash).

Features of a split are cached under `<run>/eval/features/<target>/<split>-<kind>-<hash>/` as
`shard_XXXXX.pt`, each holding a fixed range of `shard_size` dataset indices. A subset
(`knn.max_train=N` and the like) is N evenly spaced images of the split, so a folder sorted by class
gives every class, and has its own cache folder. A shard is written
atomically, so one that exists is complete: a preempted extraction continues with the missing shards
only, and another protocol asking for the same features (same target, data, transform and kind)
reads them instead of recomputing. Under torch.distributed each rank computes every world-th missing
shard; the shards on the (shared) run folder are the gather.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2

from dino import checkpoint, distributed, storage, weights
from dino.augment import IMAGENET_MEAN, IMAGENET_STD
from dino.checkpoint import CheckpointError
from dino.config import ConfigError, DinoConfig, from_dict
from dino.data import FashionMNIST, ImageFolder, SyntheticDataset, build_dataset
from dino.eval.config import (
    EvalConfig,
    _plain,
    compose_eval,
    data_identity,
    run_dir_of_checkpoint,
)
from dino.models import build_backbone
from dino.overrides import split_all
from dino.run_identity import config_hash as run_config_hash

log = logging.getLogger("dino.eval")

# Seed offset of the synthetic "test" split: the same generator with another seed gives other
# images of the same classes (the image of (seed, index) is drawn from seed * 1_000_003 + index).
SYNTHETIC_TEST_SEED_OFFSET = 1


@dataclass
class Target:
    """The network under evaluation and where it came from."""

    key: str
    """Folder name of its features and results: the checkpoint step, random-seed<N> or pixels."""
    run_dir: str
    run_cfg: DinoConfig
    backbone: nn.Module | None
    """Teacher backbone in eval mode; None for the pixels baseline."""
    provenance: dict[str, Any]
    """checkpoint path, step and config hash (None for a baseline without a checkpoint)."""

    @property
    def eval_dir(self) -> str:
        return storage.join(self.run_dir, "eval")


def _run_config_from_dir(run_dir: str) -> DinoConfig:
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise CheckpointError(f"{run_dir} is not a run folder: {path} does not exist")
    return from_dict(yaml.safe_load(storage.read_text(path)))


def teacher_backbone(state: dict[str, Any], run_cfg: DinoConfig) -> nn.Module:
    """The teacher's backbone of a checkpoint state, loaded strictly."""
    backbone = build_backbone(run_cfg.model.name, run_cfg.model.patch_size, run_cfg.crops.global_size, 0.0)
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state["teacher"].items() if k.startswith(prefix)}
    backbone.load_state_dict(weights, strict=True)
    return backbone.eval()


def resolve(overrides: list[str] | tuple[str, ...]) -> tuple[EvalConfig, Target]:
    """Parse overrides, find the checkpoint (refusing incomplete ones) and build the target."""
    first = compose_eval(overrides)
    if first.weights:
        return _resolve_weights(first, overrides)
    ckpt = None
    if first.checkpoint:
        ckpt = checkpoint.load(first.checkpoint)  # refuses a partial or corrupt checkpoint
        run_dir = first.run.dir or run_dir_of_checkpoint(first.checkpoint)
    else:
        run_dir = first.run.dir
        if first.baseline == "none":
            ckpt = checkpoint.load_latest(run_dir)
            if ckpt is None:
                raise CheckpointError(
                    f"no complete checkpoint in {storage.join(run_dir, 'checkpoints')}: "
                    "train the run first, or name one with checkpoint=<folder>"
                )
    run_cfg = from_dict(ckpt.state["config"]) if ckpt else _run_config_from_dir(run_dir)
    run_data = _plain(run_cfg.data)
    # A pretraining subset (data.limit) is not the evaluation's: knn.max_train/max_test set those.
    if "limit" in run_data:
        run_data["limit"] = 0
    cfg = compose_eval([*overrides, f"run.dir={run_dir}"], run_data)
    validate_data(cfg)
    return cfg, build_target(cfg, run_dir, run_cfg, ckpt)


def _resolve_weights(first: EvalConfig, overrides: list[str] | tuple[str, ...]) -> tuple[EvalConfig, Target]:
    """A weights file as the target: its own results folder, the architecture from the file."""
    if first.checkpoint or first.baseline != "none":
        raise ConfigError("weights= evaluates a file: leave checkpoint= and baseline= out")
    if not any(k == "data" or k.startswith("data.") for k, _ in split_all(overrides)):
        raise ConfigError(
            "weights= needs the evaluation data: data=fashion_mnist, or data=imagefolder data.root=<train> "
            "data.val_root=<val> (a weights file carries no dataset)"
        )
    loaded = weights.read(first.weights, first.weights_key)
    backbone = weights.backbone_for(loaded, first.model.name, first.model.patch_size)
    run_cfg = DinoConfig()
    run_cfg.model.name = loaded.architecture.matches()[0] if not first.model.name else first.model.name
    run_cfg.model.patch_size = first.model.patch_size or loaded.architecture.patch_size
    run_cfg.crops.global_size = loaded.architecture.img_size
    run_dir = first.run.dir or storage.join("runs", "weights", loaded.identity)
    cfg = compose_eval([*overrides, f"run.dir={run_dir}"])
    validate_data(cfg)
    provenance = {
        "run_dir": run_dir,
        "checkpoint": None,
        "step": loaded.step,
        "config_hash": None,
        "baseline": "none",
        "weights": loaded.path,
        "weights_sha256": loaded.sha256,
        "weights_format": loaded.format,
        "weights_key": loaded.key,
    }
    return cfg, Target(f"weights-{loaded.sha256[:12]}", run_dir, run_cfg, backbone, provenance)


def build_target(
    cfg: EvalConfig, run_dir: str, run_cfg: DinoConfig, ckpt: checkpoint.LoadedCheckpoint | None
) -> Target:
    provenance: dict[str, Any] = {
        "run_dir": run_dir,
        "checkpoint": ckpt.path if ckpt else None,
        "step": ckpt.step if ckpt else None,
        "config_hash": ckpt.marker.get("config_hash") if ckpt else run_config_hash(run_cfg),
        "baseline": cfg.baseline,
    }
    if cfg.baseline == "pixels":
        return Target("pixels", run_dir, run_cfg, None, provenance)
    if cfg.baseline == "random":
        # Built as training builds it (seed, then the student's backbone first): the run's own init.
        seed = run_cfg.train.seed if cfg.baseline_seed < 0 else cfg.baseline_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(
                run_cfg.model.name, run_cfg.model.patch_size, run_cfg.crops.global_size, 0.0
            )
        provenance["seed"] = seed
        return Target(f"random-seed{seed}", run_dir, run_cfg, backbone.eval(), provenance)
    assert ckpt is not None
    return Target(f"{ckpt.step:09d}", run_dir, run_cfg, teacher_backbone(ckpt.state, run_cfg), provenance)


# --------------------------------------------------------------------------------------------------
# Data: splits and the eval transform
# --------------------------------------------------------------------------------------------------


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
        from dino.shards import ShardedDataset

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


# --------------------------------------------------------------------------------------------------
# Encoders: images -> feature vectors
# --------------------------------------------------------------------------------------------------


def cls_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS token after the final norm (what k-NN uses)."""
    return backbone.forward_features(images)[:, 0]


def multi_block_features(
    backbone: nn.Module, images: torch.Tensor, n_last: int, avgpool: bool
) -> torch.Tensor:
    """Concatenated CLS tokens of the last `n_last` blocks, each through the final norm, plus (with
    `avgpool`) the mean of the last block's normed patch tokens: the linear probe's input."""
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
    outputs = []
    depth = len(backbone.blocks)
    for i, block in enumerate(backbone.blocks):
        x = block(x)
        if i >= depth - n_last:
            outputs.append(backbone.norm(x))
    feats = [out[:, 0] for out in outputs]
    if avgpool:
        feats.append(outputs[-1][:, backbone.num_prefix_tokens :].mean(dim=1))
    return torch.cat(feats, dim=-1)


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


def build_encoder(target: Target, kind: str, n_last: int = 1, avgpool: bool = False):
    """kind: cls (k-NN) or blocks (linear probe); the pixels baseline always flattens the image."""
    if target.backbone is None:
        return pixel_features
    backbone = target.backbone
    if kind == "cls":
        return lambda images: cls_features(backbone, images)
    depth = len(backbone.blocks)
    if n_last > depth:
        raise ConfigError(
            f"linear.n_last_blocks={n_last} exceeds the {depth} blocks of {target.run_cfg.model.name}"
        )
    return lambda images: multi_block_features(backbone, images, n_last, avgpool)


# --------------------------------------------------------------------------------------------------
# Sharded feature cache
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    features: torch.Tensor
    labels: torch.Tensor
    folder: str
    computed_shards: int
    """Shards computed by this call (the others were read from the cache)."""
    split_size: int
    """Images in the whole split (more than len(labels) for a subset)."""


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


def features_folder(
    cfg: EvalConfig, target: Target, split: str, kind: str, size: int, subset: int | None = None
) -> str:
    identity = {
        # Not the paths: a run folder that moved keeps its cache.
        "target": {
            k: v for k, v in target.provenance.items() if k not in ("run_dir", "checkpoint", "weights")
        },
        "data": data_identity(cfg.data),
        "split": split,
        "kind": kind,
        "image_size": size,
        "shard_size": cfg.shard_size,
    }
    if subset is not None:  # only then: the whole split's caches keep their names
        identity["evenly_spaced"] = subset
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return storage.join(target.eval_dir, "features", target.key, f"{split}-{kind}-{digest}")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.pt"


def extract_features(
    dataset: Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    folder: str,
    *,
    split_size: int,
    shard_size: int,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> FeatureSet:
    """Features and labels of `dataset` (a split of `split_size` images, or a subset of one),
    computed shard by shard or read from cache.

    Shard i always covers dataset indices [i * shard_size, (i + 1) * shard_size), cut at the dataset
    end, so a preempted extraction resumes with the shards it lacks.
    """
    total = len(dataset)
    needed = range((total + shard_size - 1) // shard_size)
    dist = distributed.info()
    missing = [i for i in needed if not storage.exists(storage.join(folder, shard_name(i)))]
    # Every rank lists before any rank writes, so all agree on the missing shards and their split.
    distributed.barrier()
    mine = missing[dist.rank :: dist.world_size]
    if missing:
        log.info("features %s: %d of %d shards to compute", folder, len(missing), len(needed))
    for i in mine:
        start, stop = i * shard_size, min((i + 1) * shard_size, total)
        loader = DataLoader(
            torch.utils.data.Subset(dataset, range(start, stop)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        feats, labels = [], []
        with torch.inference_mode():
            for images, batch_labels in loader:
                feats.append(encode(images.to(device, non_blocking=True)).float().cpu())
                labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
        buffer = io.BytesIO()
        torch.save(
            {"features": torch.cat(feats), "labels": torch.cat(labels), "start": start, "stop": stop}, buffer
        )
        storage.atomic_write_bytes(storage.join(folder, shard_name(i)), buffer.getvalue())
    distributed.barrier()
    feats, labels = [], []
    for i in needed:
        if not storage.exists(storage.join(folder, shard_name(i))):
            raise RuntimeError(
                f"feature shard {storage.join(folder, shard_name(i))} is missing after extraction: "
                "under torch.distributed the run folder must be shared by all ranks"
            )
        shard = torch.load(
            io.BytesIO(storage.read_bytes(storage.join(folder, shard_name(i)))), weights_only=True
        )
        feats.append(shard["features"])
        labels.append(shard["labels"])
    return FeatureSet(torch.cat(feats), torch.cat(labels), folder, len(mine), split_size)


def split_features(
    cfg: EvalConfig,
    target: Target,
    split: str,
    *,
    limit: int,
    kind: str = "cls",
    n_last: int = 1,
    avgpool: bool = False,
    device: torch.device,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FeatureSet:
    """Features of one split of the evaluation data under the eval transform (cached); `limit` > 0
    takes that many evenly spaced images of the split."""
    size = image_size(cfg, target.run_cfg)
    if target.backbone is None:
        kind = "pixels"
    elif kind == "blocks":
        kind = f"last{n_last}{'-avgpool' if avgpool else ''}"
    base = eval_dataset(cfg, target.run_cfg, split)
    subset = evenly_spaced_subset(base, limit)
    dataset = TransformedDataset(subset, eval_transform(size))
    if target.backbone is not None:
        target.backbone.to(device)
    encode = encoder or build_encoder(target, "cls" if kind == "cls" else "blocks", n_last, avgpool)
    return extract_features(
        dataset,
        encode,
        features_folder(cfg, target, split, kind, size, len(subset) if subset is not base else None),
        split_size=len(base),
        shard_size=cfg.shard_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=device,
    )


def write_result(path: str, result: dict[str, Any]) -> None:
    if distributed.info().is_main:
        storage.atomic_write_text(path, json.dumps(result, indent=1, default=str))
