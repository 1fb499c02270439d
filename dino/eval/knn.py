"""Weighted k-NN classification on frozen features (the DINO protocol), chunked to fit any memory.

Features are L2-normalised; the similarity of a query to the bank is their dot product (cosine). The
k nearest bank features vote for their label with weight exp(similarity / T). The similarity matrix
is never built whole: queries and bank are both cut into chunks, and each query chunk keeps a running
top-k over the bank chunks, so an ImageNet-size bank fits in a fixed memory budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dino.config.schema import to_dict
from dino.eval.config import EvalConfig, data_identity
from dino.eval.evaluated import Evaluated, resolve
from dino.eval.features import FeatureSet, split_features
from dino.eval.results import KNN, knn_metric, log_result, write_result
from dino.eval.splits import eval_dataset, num_classes
from dino.io import distributed, storage, watchdog

log = logging.getLogger("dino.eval")

CPU_BUDGET_BYTES = 512 * 2**20


def auto_chunks(num_queries: int, num_bank: int, k: int, device: torch.device) -> tuple[int, int]:
    """(query_chunk, bank_chunk) whose similarity block uses about a quarter of the free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = CPU_BUDGET_BYTES
    query_chunk = max(1, min(num_queries, 1024))
    # The block, its top-k and the merged candidates: about 2 floats per (query, bank) pair.
    bank_chunk = max(k, min(num_bank, budget // (8 * query_chunk)))
    return query_chunk, bank_chunk


def knn_votes(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    query_chunk: int = 0,
    bank_chunk: int = 0,
) -> dict[int, torch.Tensor]:
    """Class votes [num_queries, num_classes] of each k (clipped to the bank size) for L2-normalised
    `queries` against the L2-normalised `bank`; the predicted class is the one with most votes."""
    kmax = min(max(ks), len(bank))
    auto_q, auto_b = auto_chunks(len(queries), len(bank), kmax, queries.device)
    query_chunk, bank_chunk = query_chunk or auto_q, bank_chunk or auto_b
    votes = {k: torch.zeros(len(queries), num_classes, device=queries.device) for k in ks}
    for q0 in range(0, len(queries), query_chunk):
        q = queries[q0 : q0 + query_chunk]
        top_sim = torch.empty(len(q), 0, device=q.device, dtype=q.dtype)
        top_idx = torch.empty(len(q), 0, device=q.device, dtype=torch.long)
        for b0 in range(0, len(bank), bank_chunk):
            sim = q @ bank[b0 : b0 + bank_chunk].T
            sim, idx = sim.topk(min(kmax, sim.shape[1]), dim=1)
            cand_sim, cand_idx = torch.cat([top_sim, sim], 1), torch.cat([top_idx, idx + b0], 1)
            top_sim, pos = cand_sim.topk(min(kmax, cand_sim.shape[1]), dim=1)  # sorted, descending
            top_idx = cand_idx.gather(1, pos)
        neighbour_labels = bank_labels[top_idx]
        weights = (top_sim / temperature).exp()
        for k in ks:
            kk = min(k, kmax)
            votes[k][q0 : q0 + len(q)].scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
    return votes


def accuracy(votes: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 correct, top-5 correct) counts."""
    top = votes.topk(min(5, votes.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return int(hit[:, :1].sum()), int(hit.sum())


@dataclass
class KnnResult:
    top1: dict[int, float]
    top5: dict[int, float]
    num_train: int
    num_test: int
    path: str
    record: dict[str, Any]


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    query_chunk: int = 0,
    bank_chunk: int = 0,
) -> tuple[dict[int, float], dict[int, float]]:
    """Top-1 and top-5 accuracy in percent per k. Under torch.distributed each rank classifies every
    world-th query chunk and the counts are summed, so all ranks return the same numbers."""
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    dist = distributed.info()
    qc = query_chunk or auto_chunks(len(queries), len(bank), max(ks), queries.device)[0]
    counts = torch.zeros(len(ks), 2, dtype=torch.float64)
    for c0 in range(dist.rank * qc, len(queries), qc * dist.world_size):
        q, lab = queries[c0 : c0 + qc], query_labels[c0 : c0 + qc]
        votes = knn_votes(bank, bank_labels, q, ks, temperature, num_classes, qc, bank_chunk)
        for row, k in enumerate(ks):
            counts[row] += torch.tensor(accuracy(votes[k], lab), dtype=torch.float64)
    counts = distributed.sum_across(counts)
    n = max(len(queries), 1)
    top1 = {k: 100.0 * float(counts[i, 0]) / n for i, k in enumerate(ks)}
    top5 = {k: 100.0 * float(counts[i, 1]) / n for i, k in enumerate(ks)}
    return top1, top5


def data_id(cfg: EvalConfig) -> str:
    """Short name of the evaluation data for result file names: <name>-<hash of the data config>."""
    digest = hashlib.sha256(json.dumps(data_identity(cfg.data), sort_keys=True).encode()).hexdigest()[:6]
    return f"{cfg.data.name}-{digest}"


def evaluate_knn(cfg: EvalConfig, target: Evaluated) -> KnnResult:
    """k-NN top-1/top-5 of `target` on the eval data; results JSON under <run>/eval/knn/."""
    device = distributed.rank_device(cfg.device)
    started = time.monotonic()
    train = split_features(cfg, target, "train", limit=cfg.knn.max_train, device=device)
    test = split_features(cfg, target, "test", limit=cfg.knn.max_test, device=device)
    classes = max(int(train.labels.max()), int(test.labels.max())) + 1
    classes = max(classes, num_classes(eval_dataset(cfg, target.run_cfg, "test")))
    ks = sorted(set(cfg.knn.k))
    top1, top5 = knn_accuracy(
        train.features.to(device),
        train.labels.to(device),
        test.features.to(device),
        test.labels.to(device),
        ks,
        cfg.knn.temperature,
        classes,
        cfg.knn.query_chunk,
        cfg.knn.bank_chunk,
    )
    bank_classes = int(train.labels.unique().numel())
    if bank_classes < classes:
        # A bank too small for the classes (or a split that lacks some): every query of a missing
        # class is wrong whatever the features.
        if len(train.labels) < train.split_size:
            log.warning(
                "the k-NN bank holds %d of the %d classes (knn.max_train=%d evenly spaced images of %d); "
                "raise knn.max_train or leave it 0 for the whole split",
                bank_classes, classes, cfg.knn.max_train, train.split_size,
            )  # fmt: skip
        else:
            log.warning(
                "the k-NN bank (the whole train split) holds %d of the %d classes", bank_classes, classes
            )
    record = {
        "protocol": KNN,
        **target.provenance,
        "target": target.key,
        "data": to_dict(cfg.data),
        "image_size": cfg.image_size or target.run_cfg.crops.global_size,
        "num_train": len(train.labels),
        "num_test": len(test.labels),
        "bank_classes": bank_classes,
        "num_classes": classes,
        "temperature": cfg.knn.temperature,
        "k": ks,
        "top1": {str(k): v for k, v in top1.items()},
        "top5": {str(k): v for k, v in top5.items()},
        "features": {"train": train.folder, "test": test.folder},
        # Shards in all and the ones each rank encoded itself in this call (the rest: from the cache).
        "feature_shards": {"train": train.shard_record(), "test": test.shard_record()},
        "seconds": time.monotonic() - started,
        "time": time.time(),
    }
    path = storage.join(target.eval_dir, KNN, f"{target.key}-{data_id(cfg)}{subset_id(train, test)}.json")
    write_result(path, record)
    log.info("k-NN of %s: %s (written to %s)", target.key, top1, path)
    return KnnResult(top1, top5, len(train.labels), len(test.labels), path, record)


def subset_id(train: FeatureSet, test: FeatureSet) -> str:
    """'' for the whole splits, else '-<bank>x<queries>': a quick look on a subset never replaces
    the result on the whole data (nor one on another subset)."""
    if len(train.labels) == train.split_size and len(test.labels) == test.split_size:
        return ""
    return f"-{len(train.labels)}x{len(test.labels)}"


def run_knn(
    overrides: list[str] | tuple[str, ...], on_hang: Callable[[watchdog.Hang], None] | None = None
) -> KnnResult:
    """`dinolab eval knn`: resolve the checkpoint (or baseline) from overrides, evaluate it and log the
    result to the run's MLflow run. A rank without progress for cfg.hang_timeout_s stops the process
    (`on_hang` first, dino/io/watchdog.py)."""
    cfg, target = resolve(overrides)
    # torchrun/SLURM: one process per device, each its share of the shards
    dist = distributed.setup(cfg.device, cfg.hang_timeout_s)
    main = dist.is_main
    health = watchdog.Watchdog(target.eval_dir, dist.rank, dist.world_size,
                               cfg.hang_timeout_s, job=KNN, on_hang=on_hang).start()  # fmt: skip
    try:
        result = evaluate_knn(cfg, target)
    finally:
        health.stop()
        distributed.destroy()
    if main:
        log_result(cfg, result.record, knn_metrics(result), result.path)
    return result


def knn_metrics(result: KnnResult) -> dict[str, float]:
    """knn_top1_k20 and the like: top-1 and top-5 of every k."""
    return {knn_metric(n, k): v for n, acc in ((1, result.top1), (5, result.top5)) for k, v in acc.items()}
