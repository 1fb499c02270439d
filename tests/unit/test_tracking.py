"""Tracking pieces that need no server: store URIs, the sweep's default store, collapse flags, and
the tracker's outage path (an unreachable store: training code never blocks, updates are spooled to
disk and sent by the next tracker of the run)."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from dino.config.schema import ConfigError
from dino.io import mlflow_store
from dino.io.mlflow_tracker import PENDING, MLflowTracker
from launcher.sweep_file import SweepError, load_sweep
from reports.collect import flag


def test_sqlite_uris_resolve_to_absolute_files(tmp_path):
    assert mlflow_store.sqlite_path(f"sqlite:///{tmp_path}/m.db") == f"{tmp_path}/m.db"
    assert mlflow_store.sqlite_path("http://host:5000") is None
    assert mlflow_store.sqlite_uri("runs").startswith("sqlite:////")


def test_a_sweep_tracks_into_sqlite_beside_its_runs_unless_told_otherwise(tmp_path):
    sweep = load_sweep("sweeps/quickstart.yaml", [f"root={tmp_path}"])
    assert sweep.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert load_sweep("sweeps/quickstart.yaml", ["tracking_uri=none"]).tracking_uri == ""
    with pytest.raises(SweepError, match="tracking_uri: 'mlruns' is no MLflow store"):
        load_sweep("sweeps/quickstart.yaml", ["tracking_uri=mlruns"])


def test_a_file_store_uri_is_refused_with_the_fix(tiny_cfg):
    with pytest.raises(ConfigError, match="tracking.uri=./mlruns .*sqlite:////"):
        tiny_cfg("tracking.uri=./mlruns")


@pytest.mark.parametrize(
    ("loss", "entropy", "kl", "expected"),
    [
        (5.0, 4.0, 0.5, ""),
        (float("nan"), 4.0, 0.5, "diverged (NaN loss)"),
        (6.9, 0.01, 0.5, "collapsed (one dimension)"),
        (6.9, math.log(1024) - 0.01, 0.001, "collapsed (uniform)"),
        (8.1, math.log(1024) - 0.05, 1.2, "collapsed (uniform)"),  # the quickstart's m0.9 runs
        (6.9, 0.9 * math.log(1024), 0.8, ""),
    ],
)
def test_collapse_and_divergence_flags(loss, entropy, kl, expected):
    assert flag(pd.Series({"loss": loss, "teacher_entropy": entropy, "kl": kl}), 1024) == expected


def test_unreachable_store_never_blocks_and_spools_for_the_next_tracker(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    down = MLflowTracker("http://127.0.0.1:9", str(run_dir), experiment="e", flush_timeout_s=1.0)
    started = time.monotonic()
    down.log_params({"lr": 0.1})
    for step in range(1, 6):
        down.log_metrics({"loss": 1.0 / step}, step)
    assert time.monotonic() - started < 0.5  # the caller only enqueues
    down.close("FINISHED")
    spooled = [json.loads(line) for line in (run_dir / PENDING).read_text().splitlines()]
    assert [s["kind"] for s in spooled][:2] == ["params", "metrics"] and len(spooled) == 7
    assert "pending update(s) written to" in caplog.text

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    up = MLflowTracker(uri, str(run_dir), experiment="e", flush_timeout_s=60)
    up.log_metrics({"loss": 0.1}, 6)
    up.close("FINISHED")
    assert not (run_dir / PENDING).exists()
    client = MlflowClient(uri)
    run = client.get_run(json.loads((run_dir / "tracking.json").read_text())["run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert run.data.params["lr"] == "0.1" and run.info.status == "FINISHED"
