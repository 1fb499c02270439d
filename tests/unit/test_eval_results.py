"""Where evaluation flows: result names defined once (dino/eval/results.py) and read by status and
reports; an EvalJob calls the protocol itself and sees its exceptions; no launcher import cycle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dino.config.schema import ConfigError
from dino.eval import results
from dino.eval.linear import linear_metrics
from launcher import records
from launcher.jobs import EvalJob


def test_headline_is_knn_top1_at_k20_or_the_linear_final_top1():
    assert results.headline({"protocol": "knn", "top1": {"10": 50.0, "20": 61.25}}) == 61.25
    assert results.headline({"protocol": "knn", "top1": {"5": 40.0, "200": 45.0}}) == 40.0  # no k=20
    linear = {
        "protocol": "linear",
        "linear": {"lr": 0.1},
        "final": {"top1": 70.5},
        "best_over_epochs": {"top1": 71.0},
    }
    assert results.headline(linear) == 70.5
    assert results.headline({"protocol": "other", "top1": 1.0}) is None


def test_metric_and_column_names():
    assert results.knn_metric(1, results.HEADLINE_K) == "knn_top1_k20"
    assert results.EVAL_COLUMNS == {"knn_top1@20": "knn_top1_k20", "linear_top1": "linear_top1",
                                    "linear_best_top1": "linear_best_top1"}  # fmt: skip
    record = {
        "final": {"top1": 70.0, "top5": 90.0},
        "best_over_epochs": {"top1": 72.0},
        "lr_grid": {"chosen_lr": 0.01, "heads": [{"lr": 0.01, "val_top1": 60.0, "top1": 70.0},
                                                 {"lr": 0.1, "val_top1": 50.0, "top1": 65.0}]},
    }  # fmt: skip
    assert linear_metrics(record) == {
        "linear_top1": 70.0, "linear_top5": 90.0, "linear_best_top1": 72.0, "linear_lr": 0.01,
        "linear_grid_lr0.01_val_top1": 60.0, "linear_grid_lr0.01_top1": 70.0,
        "linear_grid_lr0.1_val_top1": 50.0, "linear_grid_lr0.1_top1": 65.0,
    }  # fmt: skip


def test_eval_job_calls_the_protocol_and_records_its_outcome(tmp_path, monkeypatch):
    import dino.eval.knn as knn

    run_dir = str(tmp_path / "run")
    records.update_record(run_dir, state=records.COMPLETED)
    calls = []
    monkeypatch.setattr(knn, "run_knn", lambda overrides, on_hang=None: calls.append(overrides))
    assert EvalJob("knn", run_dir, ["knn.max_test=8"])() == {"run_dir": run_dir, "protocol": "knn"}
    assert calls == [[f"run.dir={run_dir}", "knn.max_test=8"]]
    assert records.read_record(run_dir)["evals"] == {"knn": records.COMPLETED}

    def refuse(overrides, on_hang=None):
        raise ConfigError("no such data")

    monkeypatch.setattr(knn, "run_knn", refuse)
    with pytest.raises(ConfigError, match="no such data"):  # the evaluation's own error, not an exit code
        EvalJob("knn", run_dir)()
    assert records.read_record(run_dir)["evals"] == {"knn": records.FAILED}


def test_eval_job_of_a_collapsed_run_skips_without_evaluating(tmp_path, monkeypatch):
    import dino.eval.linear as linear

    run_dir = str(tmp_path / "run")
    records.update_record(run_dir, state=records.COLLAPSED, collapse_step=8, collapse_signal="entropy")
    monkeypatch.setattr(
        linear, "run_linear", lambda overrides, on_hang=None: pytest.fail("evaluated a collapsed run")
    )
    assert "skipped" in EvalJob("linear", run_dir)()
    assert records.read_record(run_dir)["evals"] == {"linear": records.SKIPPED}
    assert "collapsed at step 8" in records.eval_reason(run_dir, "linear")


def test_the_sweep_planner_does_not_import_the_cli():
    code = "import sys, launcher.plan; assert 'launcher.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
