"""`dinolab report` on runs logged through the real MLflow API into a real SQLite store.

A 3-value multi-crop ablation × 3 seeds, with one run still running and one collapsed run, must give
the golden Markdown and LaTeX tables (tests/golden/report.*; regenerate with DINOLAB_UPDATE_GOLDEN=1),
and the HTML page must hold the plots.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tests.integration.cli import dinolab

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
K = 1024


def log_run(client, exp_id, parent, num_local, seed, status="FINISHED", collapsed=False):
    name = f"nl{num_local}-s{seed}"
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.parentRunId": parent, "dinolab.kind": "run", "dinolab.run_id": f"id{num_local}{seed}",
        "axis.crops.num_local": str(num_local), "dinolab.seed": str(seed)})  # fmt: skip
    rid = run.info.run_id
    steps = 10 if status == "FINISHED" else 4
    metrics = []
    for step in range(1, steps + 1):
        entropy = math.log(K) - 0.005 if collapsed else 5.0 - 0.2 * step
        values = {"loss": 6.0 - 0.3 * step, "teacher_entropy": entropy, "kl": 1e-4 if collapsed else 0.5,
                  "epoch": step / 5, "avg_img_per_s": 1000 - 50 * num_local + seed,
                  "memory_gib": 9.0 + 0.5 * num_local, "gpu_hours": 0.1 * step * (1 + num_local / 10)}  # fmt: skip
        if seed == 0 and step % 5 == 0:  # monitor.knn_every_steps=5 on the seed-0 runs
            values["monitor_knn_top1"] = 50 + step + num_local
        metrics += [Metric(k, v, 1_000 * step, step) for k, v in values.items()]
    if status == "FINISHED":
        top1 = 60 + 2 * num_local + seed - (30 if collapsed else 0)
        metrics += [
            Metric("knn_top1_k20", top1, 20_000, steps),
            Metric("linear_top1", top1 + 5, 20_000, steps),
        ]
    client.log_batch(rid, metrics=metrics, params=[Param("head.out_dim", str(K)), Param("train.seed", str(seed))],
                     tags=[RunTag("dinolab.config_hash", f"h{num_local}{seed}")])  # fmt: skip
    if status == "FINISHED":
        client.set_terminated(rid, "FINISHED")


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('report') / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("multicrop-fake")
    parent = client.create_run(exp_id, run_name="multicrop-fake", tags={"dinolab.kind": "sweep"}).info.run_id
    for num_local in (0, 2, 6):
        for seed in (0, 1, 2):
            running = (num_local, seed) == (6, 2)
            log_run(client, exp_id, parent, num_local, seed, "RUNNING" if running else "FINISHED",
                    collapsed=(num_local, seed) == (0, 1))  # fmt: skip
    return uri


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DINOLAB_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), (
        f"{name} differs from the golden file (DINOLAB_UPDATE_GOLDEN=1 to accept)"
    )


def report(uri: str, *args: str):
    proc = dinolab("report", "--experiment", "multicrop-fake", "--tracking-uri", uri, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_markdown_table_matches_golden(fake_sweep):
    out = report(fake_sweep, "--paper").stdout
    check_golden("report.md", out)
    # The collapsed run of num_local=0 is counted once: not also among the finished.
    assert "| 2 finished; 1 collapsed (uniform) |" in out and "2 finished, 1 running" in out


@pytest.mark.parametrize(
    "runs, summary",
    [
        ([("finished", "collapsed (uniform)")], "1 collapsed (uniform)"),
        ([("collapsed", "collapsed (uniform)")], "1 collapsed (uniform)"),  # stopped by the guard
        ([("collapsed", "")], "1 collapsed"),  # stopped by the guard, final entropy in between
        ([("finished", ""), ("finished", ""), ("finished", "collapsed (one dimension)"), ("failed", "")],
         "2 finished, 1 failed; 1 collapsed (one dimension)"),
        ([("running", "diverged (NaN loss)"), ("finished", "")], "1 finished; 1 running and diverged (NaN loss)"),
    ],
)  # fmt: skip
def test_the_state_column_counts_each_run_once(runs, summary):
    import pandas as pd

    from reports.tables import state_summary

    assert state_summary(pd.DataFrame(runs, columns=["state", "flag"])) == summary


def test_latex_table_matches_golden(fake_sweep, tmp_path):
    report(fake_sweep, "--format", "latex", "-o", str(tmp_path / "table.tex"))
    check_golden("report.tex", (tmp_path / "table.tex").read_text())


def test_html_page_holds_tables_and_plots(fake_sweep, tmp_path):
    report(fake_sweep, "--html", str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text()
    # metric vs axis; the monitor's k-NN curves, k-NN, loss, entropy per run
    assert page.count("data:image/png;base64,") == 5 and "k-NN top-1 during pretraining" in page
    assert page.count("<table") == 2 and "nl6-s2" in page and "collapsed (uniform)" in page


def test_unknown_experiment_is_one_clear_error(fake_sweep):
    proc = dinolab("report", "--experiment", "nope", "--tracking-uri", fake_sweep)
    assert proc.returncode == 2 and "no experiment 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_report_of_a_sweep_that_never_ran_creates_nothing(tmp_path):
    """A report only reads: on a sweep that was never submitted it says so in one line (exit 2)
    instead of letting MLflow create an empty store (and the sweep's root) to read from."""
    sweep_file = tmp_path / "fresh.yaml"
    sweep_file.write_text(
        "name: fresh\nroot: " + str(tmp_path / "root") + "\nbase: [model=vit_test]\n"
        "grid:\n  teacher.momentum: [0.9, 0.996]\nseeds: [0]\n"
    )
    proc = dinolab("report", str(sweep_file))
    store = f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"dinolab report: error: no MLflow store at {store}: the sweep has not run "
        f"(submit it first: dinolab sweep submit {sweep_file})\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.yaml"]  # no root, no mlflow.db

    db = tmp_path / "elsewhere" / "mlflow.db"  # the same without a sweep file
    proc = dinolab("report", "--experiment", "fresh", "--tracking-uri", f"sqlite:///{db}")
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == f"dinolab report: error: no MLflow store at sqlite:///{db}: nothing has been tracked there\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.yaml"]


def test_report_with_a_weights_file_adds_its_row_beside_the_runs(fake_sweep, tmp_path):
    from tests.unit.test_weights import FIXTURES

    results = tmp_path / "released"
    backbone = FIXTURES / "backbone_pretrain.pth"
    proc = dinolab(
        "eval", "knn", f"weights={backbone}", "data=synthetic", "data.image_size=32", "workers=0",
        f"run.dir={results}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = (json.loads(p.read_text()) for p in (results / "eval" / "knn").glob("*.json"))
    sweep = tmp_path / "multicrop-fake.yaml"
    sweep.write_text(
        f"name: multicrop-fake\nroot: {Path(fake_sweep.removeprefix('sqlite:///')).parent}\n"
        "base: [model=vit_test, data=synthetic, data.image_size=32]\ngrid: {crops.num_local: [0, 2, 6]}\n"
    )
    page = tmp_path / "report.html"
    shown = dinolab("report", str(sweep), "--with", str(results), "--html", str(page))
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "<td>weights: backbone_pretrain</td>" in page.read_text()  # the page's table has the row too
    row = next(line for line in shown.stdout.splitlines() if "weights: backbone_pretrain" in line)
    assert f"| {record['top1']['20']:.1f} " in row.replace("**", "")
    assert f"weights {backbone} (k-NN on {record['num_test']} test images)" in row
    assert shown.stdout.count("| 0 ") + shown.stdout.count("| 2 ") + shown.stdout.count("| 6 ") >= 3

    other = dinolab("report", str(sweep), "data=fashion_mnist", "--with", str(results))
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1].startswith(
        f"dinolab report: error: --with {results}: no k-NN or finished linear result on data fashion_mnist"
    )
