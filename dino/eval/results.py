"""Evaluation results: the names they go by and their JSONs under `<folder>/eval/<protocol>/`.

The one place that names what the evaluations produce: the protocols, the MLflow metrics an
evaluation logs (`knn.run_knn`, `linear.run_linear`), the report columns that read them
(`reports/collect.py`, `reports/tables.py`) and the headline `status` shows. Light on imports on
purpose: status, exports and reports read results without torch.

An evaluation's result also goes into MLflow, by the evaluation itself (`log_result`): into its run's
MLflow run (when the run is tracked) at the checkpoint's step; baselines under `baseline_<kind>/` so
they never pass for the run's own result. A weights file's evaluation goes to its own MLflow run
(tagged dinolab.kind=weights) when tracking_uri= is given.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from dino.io import storage
from dino.io.mlflow_tracker import MLflowTracker, open_run_tracker
from dino.io.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from dino.eval.config import EvalConfig

KNN, LINEAR = "knn", "linear"
PROTOCOLS = (KNN, LINEAR)

HEADLINE_K = 20
"""The k of the k-NN headline (the paper's)."""


def knn_metric(top: int, k: int) -> str:
    """MLflow metric of k-NN top-`top` accuracy at `k`, e.g. knn_top1_k20."""
    return f"knn_top{top}_k{k}"


LINEAR_TOP1, LINEAR_TOP5, LINEAR_BEST_TOP1 = "linear_top1", "linear_top5", "linear_best_top1"
LINEAR_LR = "linear_lr"
"""The learning rate chosen among `linear.lr`'s list."""


def linear_grid_metric(lr: float, which: str) -> str:
    """MLflow metric of one head of a learning-rate grid; `which`: val_top1 or top1."""
    return f"linear_grid_lr{lr:g}_{which}"


MONITOR_TOP1, MONITOR_TOP5 = "monitor_knn_top1", "monitor_knn_top5"
"""Training metrics of the live k-NN monitor (`monitor.knn_every_*`, dino/eval/monitor.py)."""

KNN_HEADLINE_COLUMN = f"knn_top1@{HEADLINE_K}"
"""Report column of the k-NN headline (MLflow keys allow no "@", columns do)."""
# Report column -> the MLflow metric it reads.
EVAL_COLUMNS = {
    KNN_HEADLINE_COLUMN: knn_metric(1, HEADLINE_K),
    LINEAR_TOP1: LINEAR_TOP1,
    LINEAR_BEST_TOP1: LINEAR_BEST_TOP1,
}


def headline(result: dict[str, Any]) -> float | None:
    """k-NN: top-1 at k = HEADLINE_K (the first k when it was not evaluated); linear: the final
    top-1. None for a result without one."""
    if result.get("protocol") == KNN:
        top1 = result.get("top1") or {}
        return top1.get(str(HEADLINE_K), next(iter(top1.values()), None))
    if result.get("protocol") == LINEAR:
        return (result.get("final") or {}).get("top1")
    return None


def write_result(path: str, result: dict[str, Any]) -> None:
    """Rank 0 writes a protocol's result JSON (atomically: a result that exists is complete)."""
    from dino.io import distributed  # torch: only the writers pay for it

    if distributed.info().is_main:
        storage.atomic_write_text(path, json.dumps(result, indent=1, default=str))


def read_results(folder: str, protocol: str) -> list[tuple[str, dict[str, Any]]]:
    """(file name, result) of every result JSON of `protocol` under `folder`, oldest first (results
    carry their finish time)."""
    base = storage.join(folder, "eval", protocol)
    found = [
        (name, json.loads(storage.read_text(storage.join(base, name))))
        for name in storage.listdir(base)
        if name.endswith(".json")
    ]
    return sorted(found, key=lambda item: item[1].get("time", 0))


# ---- into MLflow ---------------------------------------------------------------------------------
def log_result(cfg: EvalConfig, record: dict[str, Any], metrics: dict[str, float], path: str) -> None:
    """`metrics` and the result JSON at `path` (as artifact under eval/<protocol>) of `record`."""
    baseline = record.get("baseline", "none")
    prefix = "" if baseline == "none" else f"baseline_{baseline}/"
    tracker = _weights_tracker(cfg, record) if record.get("weights") else open_run_tracker(record["run_dir"])
    tracker.log_metrics({prefix + k: v for k, v in metrics.items()}, int(record.get("step") or 0))
    tracker.log_artifact(path, f"eval/{record['protocol']}")
    tracker.close()


def _weights_tracker(cfg: EvalConfig, record: dict[str, Any]) -> Tracker:
    """The MLflow run of a weights file's evaluations (tied to its results folder by tracking.json)."""
    if not cfg.tracking_uri or cfg.tracking_uri == "none":
        return NullTracker()
    name = os.path.basename(record["run_dir"].rstrip("/"))
    tracker = MLflowTracker(
        cfg.tracking_uri, record["run_dir"], cfg.tracking_experiment, name, training=False
    )
    tracker.set_tags({"dinolab.kind": "weights", "dinolab.weights_sha256": record["weights_sha256"],
                      "dinolab.weights_format": record["weights_format"]})  # fmt: skip
    tracker.log_params({"weights": record["weights"], "weights_key": record["weights_key"],
                        "data.name": record["data"]["name"], "data.root": record["data"].get("root", "")})  # fmt: skip
    tracker.finish()  # only evaluations: nothing runs on
    return tracker
