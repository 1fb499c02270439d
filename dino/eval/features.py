"""The feature cache: features of an evaluation split, computed once and read back by every protocol.

Features of a split are cached under `<run>/eval/features/<target>/<split>-<kind>-<hash>/` as
`shard_XXXXX.pt`, each holding a fixed range of `shard_size` dataset indices. A subset
(`knn.max_train=N` and the like) is N evenly spaced images of the split, so a folder sorted by class
gives every class, and has its own cache folder. A shard is written
atomically, so one that exists is complete: a preempted extraction continues with the missing shards
only, and another protocol asking for the same features (same target, data, transform and kind)
reads them instead of recomputing. Under torch.distributed each rank computes every world-th missing
shard; the shards on the (shared) run folder are the gather. Each rank counts the shards it encoded
itself, and every rank's list is gathered (`FeatureSet.computed_by_rank`: the k-NN result's
`feature_shards`), so the split of the work between ranks is on record.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dino.eval.config import EvalConfig, data_identity
from dino.eval.encoders import build_encoder
from dino.eval.evaluated import Evaluated
from dino.eval.splits import (
    TransformedDataset,
    eval_dataset,
    eval_transform,
    evenly_spaced_subset,
    image_size,
)
from dino.io import distributed, storage, watchdog

log = logging.getLogger("dino.eval")


@dataclass
class FeatureSet:
    features: torch.Tensor
    labels: torch.Tensor
    folder: str
    computed_by_rank: list[list[int]]
    """The shard indices each rank (in rank order) encoded in this call; the others were read from
    the cache. One list in one process."""
    split_size: int
    """Images in the whole split (more than len(labels) for a subset)."""
    shards: int = 0
    """Shards of the whole (subset of the) split."""

    def shard_record(self) -> dict:
        """What a result records of the extraction: shards in all, and which rank encoded which."""
        return {"shards": self.shards, "computed_by_rank": self.computed_by_rank}


def features_folder(
    cfg: EvalConfig, target: Evaluated, split: str, kind: str, size: int, subset: int | None = None
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


def encode_dataset(
    dataset: Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 features on the CPU, long labels) of every image of `dataset`, in order: the one loop
    of the cache's shards and of the k-NN monitor (which encodes under autocast: `autocast_dtype`)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda"
    )
    autocast = (
        torch.autocast(device.type, autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    feats, labels = [], []
    with torch.inference_mode(), autocast:
        for images, batch_labels in loader:
            feats.append(encode(images.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
            watchdog.progress()
    return torch.cat(feats), torch.cat(labels)


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
    computed = []  # what this rank encoded and wrote itself
    for i in mine:
        start, stop = i * shard_size, min((i + 1) * shard_size, total)
        feats, labels = encode_dataset(
            Subset(dataset, range(start, stop)), encode, batch_size=batch_size, workers=workers, device=device
        )
        buffer = io.BytesIO()
        torch.save({"features": feats, "labels": labels, "start": start, "stop": stop}, buffer)
        storage.atomic_write_bytes(storage.join(folder, shard_name(i)), buffer.getvalue())
        computed.append(i)
    distributed.barrier()
    computed_by_rank = distributed.all_gather_object(computed)
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
    return FeatureSet(
        torch.cat(feats), torch.cat(labels), folder, computed_by_rank, split_size, shards=len(needed)
    )


def split_features(
    cfg: EvalConfig,
    target: Evaluated,
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
