"""reports/search.py on plain frames: the sign of ρ follows the search's mode and the column's better,
the warnings' order, a ρ that cannot be computed, and a pruned cell without its cell_value tag."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from reports import search

SEARCH = {"metric": "monitor_loss", "mode": "min", "rungs": [0.25, 0.5, 1.0]}


def runs(rung0, rung1, final, states=None) -> pd.DataFrame:
    df = pd.DataFrame({"state": states or ["finished"] * len(final), "search:rung0": rung0,
                       "search:rung1": rung1, "knn_top1@20": final})  # fmt: skip
    df.attrs["search"] = SEARCH
    return df


def test_a_minimized_rung_metric_that_ranks_like_the_final_one_has_rho_one():
    # lower loss at the rung, higher k-NN at the end: the same ranking
    df = runs([5.0, 4.0, 3.0, 2.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0], [60.0, 61.0, 62.0, 63.0, 64.0])
    found = search.correlations(df, "knn_top1@20", "max")
    assert [(c.label(), c.n, c.warning) for c in found] == [("rung 0.25", 5, ""), ("rung 0.5", 5, "")]
    assert [c.rho for c in found] == pytest.approx([1.0, 1.0])
    # a final column where lower is better (GPU-hours) turns the sign back
    assert search.correlations(df, "knn_top1@20", "min")[0].rho == pytest.approx(-1.0)
    assert search.correlations(df, "knn_top1@20", "min")[0].warning == search.LOW_RHO


def test_too_few_runs_is_said_before_a_low_rho_and_names_the_sweep_file():
    df = runs([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0], [60.0, 61.0, 62.0, 63.0, 64.0],
              states=["finished", "finished", "pruned", "running", "finished"])  # fmt: skip
    (c, _) = search.correlations(df, "knn_top1@20", "max", "sweeps/lr.yaml")
    assert c.n == 3 and c.rho == pytest.approx(-1.0)
    assert c.warning == ("too few runs reached the end to judge the rung (n=3); revive the pruned runs with "
                         "`dinolab sweep submit sweeps/lr.yaml --only pruned` to measure it")  # fmt: skip


def test_a_rho_that_cannot_be_computed_is_shown_undefined_and_warned():
    df = runs([2.0] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [60.0, 61.0, 62.0, 63.0, 64.0, 65.0])
    c = search.correlations(df, "knn_top1@20", "max")[0]
    assert math.isnan(c.rho) and c.warning == search.LOW_RHO
    assert search.correlation_line(c, "monitor_loss", "k-NN top-1 (k=20)") == (
        "rung 0.25 (monitor_loss) → final k-NN top-1 (k=20): Spearman ρ = — (undefined) over 6 runs"
    )


def test_a_plain_sweep_has_no_correlation_and_no_pruned_section():
    df = pd.DataFrame({"state": ["finished"], "knn_top1@20": [60.0], "a": [1]})
    assert search.correlations(df, "knn_top1@20", "max") == []
    assert search.pruned_section(df.iloc[:0], ["a"], None, "markdown") == ""


def test_a_pruned_cell_without_its_cell_value_tag_takes_its_runs_mean_at_the_rung():
    pruned = pd.DataFrame({"a": [1, 1, 2], "state": ["pruned"] * 3, "search:rung0": [3.0, 5.0, 9.0],
                           "search:rung1": [1.0, 1.0, 2.0], "search:pruned_at": [0.5, 0.5, 0.25],
                           "search:saved_gpu_hours": [0.5, 0.25, float("nan")]})  # fmt: skip
    cells = search.pruned_cells(pruned, ["a"], SEARCH)
    assert cells[["a", "pruned_at", "value", "seeds"]].values.tolist() == [
        [2, 0.25, 9.0, 1],
        [1, 0.5, 1.0, 2],
    ]
    assert cells["saved"].tolist()[1] == pytest.approx(0.75) and math.isnan(cells["saved"].tolist()[0])
    assert search.total_line(cells) == "2 cells pruned, 0.75 GPU-hours saved"


def test_a_finished_run_the_report_flags_is_no_result_and_does_not_judge_the_rung():
    # Measured on Fashion-MNIST (docs/sweeps.md): the best cell at the rung collapsed later; the table
    # leaves it out (flag "collapsed (uniform)"), and so must the correlation.
    df = runs([5.0, 4.0, 3.0, 2.0, 1.0, 0.1], [1.0] * 6, [60.0, 61.0, 62.0, 63.0, 64.0, 10.0])  # loss: min
    df["flag"] = ["", "", "", "", "", "collapsed (uniform)"]
    c = search.correlations(df, "knn_top1@20", "max")[0]
    assert (c.n, c.warning) == (5, "") and c.rho == pytest.approx(1.0)
