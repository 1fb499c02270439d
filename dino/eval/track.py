"""An evaluation's result into MLflow, by the evaluation itself (`knn.run_knn`, `linear.run_linear`).

Into its run's MLflow run (when the run is tracked) at the checkpoint's step; baselines under
`baseline_<kind>/` so they never pass for the run's own result. A weights file's evaluation goes to
its own MLflow run (tagged dinolab.kind=weights) when tracking_uri= is given.
"""

from __future__ import annotations

import os
from typing import Any

from dino.eval.config import EvalConfig
from dino.io.tracking import NullTracker, Tracker, open_run_tracker


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
    from dino.io.mlflow_tracker import MLflowTracker

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
