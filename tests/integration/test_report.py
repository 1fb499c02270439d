"""`dinolab report` on runs logged through the real MLflow API into a real SQLite store.

A 3-value multi-crop ablation × 3 seeds, with one run still running and one collapsed run, must give
the golden Markdown, LaTeX, HTML and CSV tables, with intervals, comparisons against a reference cell
and the seeds a difference needs (tests/golden/report.*; regenerate with DINOLAB_UPDATE_GOLDEN=1),
and the HTML page must hold the plots. A quickstart-shaped sweep (one seed per cell, collapsed runs)
bolds nothing and gives every number its interval or "1 seed".
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tests.integration.cli import dinolab

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
K = 1024


def top1(num_local: int, seed: int) -> float:
    """The fake k-NN top-1 (points, a whole number of the 1,000 test images): 2 points per local crop
    pair, a seed effect shared by every cell, and a little of each cell's own."""
    return 60 + 2 * num_local + 1.5 * seed + 0.7 * ((num_local + 2 * seed) % 3)


def log_run(client, exp_id, parent, num_local, seed, status="FINISHED", collapsed=False, results=None,
            tags=None, params=()):  # fmt: skip
    name = f"nl{num_local}-s{seed}"
    tags = {"dinolab.run_dir": f"/runs/multicrop-fake/{name}-id{num_local}{seed}"} if tags is None else tags
    run = client.create_run(exp_id, run_name=name, tags={
        "mlflow.parentRunId": parent, "dinolab.kind": "run", "dinolab.run_id": f"id{num_local}{seed}",
        "axis.crops.num_local": str(num_local), "dinolab.seed": str(seed), **tags})  # fmt: skip
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
        knn = round(top1(num_local, seed) - (30 if collapsed else 0), 1)
        metrics += [
            Metric("knn_top1_k20", knn, 20_000, steps),
            Metric("linear_top1", knn + 5, 20_000, steps),
            Metric("linear_lr", 0.01, 20_000, steps),
            Metric("baseline_random/knn_top1_k20", 55.0 + seed, 20_000, 0),  # the seed's own init
        ]
    client.log_batch(rid, metrics=metrics, params=[Param("head.out_dim", str(K)), Param("train.seed", str(seed)),
                                                   *(Param(k, v) for k, v in params)],
                     tags=[RunTag("dinolab.config_hash", f"h{num_local}{seed}")])  # fmt: skip
    if status == "FINISHED":  # the evaluations' result JSONs, as dino/eval/results.py:log_result keeps them
        chosen = "held-out 0.1 of the train split (500 images)"
        for protocol, record in (
            ("knn", {"protocol": "knn", "baseline": "none", "num_test": 1000, "time": 2.0}),
            ("knn", {"protocol": "knn", "baseline": "random", "num_test": 1000, "time": 1.0}),
            ("linear", {"protocol": "linear", "baseline": "none", "num_test": 1000, "time": 3.0,
                        "lr_grid": {"chosen_lr": 0.01, "chosen_on": chosen}}),
        ):  # fmt: skip
            path = results / f"{name}-{protocol}-{record['baseline']}.json"
            path.write_text(json.dumps(record))
            client.log_artifact(rid, str(path), f"eval/{protocol}")
        client.set_terminated(rid, "FINISHED")


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    """A 3-value multi-crop ablation x 3 seeds in a real SQLite store: nl0-s1 collapsed, nl6-s2 still
    running; k-NN and linear results on 1,000 test images, a random-init k-NN per run."""
    folder = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("multicrop-fake", artifact_location=f"file://{folder / 'mlartifacts'}")
    parent = client.create_run(exp_id, run_name="multicrop-fake", tags={"dinolab.kind": "sweep"}).info.run_id
    results = folder / "results"
    results.mkdir()
    for num_local in (0, 2, 6):
        for seed in (0, 1, 2):
            running = (num_local, seed) == (6, 2)
            log_run(client, exp_id, parent, num_local, seed, "RUNNING" if running else "FINISHED",
                    collapsed=(num_local, seed) == (0, 1), results=results)  # fmt: skip
    # A second table in the same store whose runs trained with different code (dinolab.code_hash):
    # two with c0de1, one with c0de2, one started before code hashes were kept (no tag), which is
    # also a lone `dinolab train` (its folder from the run.dir param, no dinolab.run_dir tag).
    mixed = client.create_experiment("mixed-code", artifact_location=f"file://{folder / 'mlartifacts'}")
    for num_local, seed, code in ((0, 0, "c0de1"), (0, 1, "c0de1"), (2, 0, "c0de2"), (2, 1, None)):
        tags = {"dinolab.code_hash": code} if code else {}
        if code:
            tags["dinolab.run_dir"] = f"/runs/mixed-code/nl{num_local}-s{seed}"
        log_run(client, mixed, parent, num_local, seed, results=results, tags=tags,
                params=() if code else [("run.dir", "runs/default")])  # fmt: skip
    log_search(client, "search-fake", folder, revived=False)
    log_search(client, "search-revived", folder, revived=True)
    return uri


# A successive-halving search (issue 30) over optim.lr x teacher.temp, rungs [0.2, 1.0], keep 3: per run
# (lr, temp, seed) -> (monitor_knn_top1 at rung 0.2, final k-NN top-1, final linear top-1, GPU-hours a
# pruned run saved). The 3 cells with the best mean at the rung finish; the 6 others are pruned, the
# (0.001, 0.06) cell with both its seeds (mean 48.5). Revived (`--only pruned`), every run ends.
SEARCH = {
    (0.0001, 0.02, 0): (41.0, 62.0, 75.0, 0.8),
    (0.0001, 0.04, 0): (43.0, 63.5, 78.0, 0.8),
    (0.0001, 0.06, 0): (44.5, 63.0, 71.0, 0.8),
    (0.0003, 0.02, 0): (46.0, 66.0, 74.0, 1.2),
    (0.0003, 0.04, 0): (52.0, 70.1, 72.5, None),
    (0.0003, 0.06, 0): (50.5, 71.0, 73.0, None),
    (0.001, 0.02, 0): (47.5, 65.5, 77.0, 1.6),
    (0.001, 0.04, 0): (53.5, 71.9, 70.0, None),
    (0.001, 0.06, 0): (48.0, 67.0, 76.0, 1.6),
    (0.001, 0.06, 1): (49.0, 68.5, 72.0, 1.6),
}
PRUNED_WITH_KNN = (0.0001, 0.06, 0)  # a pruned run whose k-NN was evaluated anyway: 99.0, never a result


def log_search(client, experiment: str, folder, revived: bool) -> None:
    """The runs of SEARCH with the tags the launcher's decision step sets (dinolab.search.*); `revived`: the
    pruned ones were revived with --only pruned and finished (dinolab.state revived or completed, or none)."""
    exp = client.create_experiment(experiment, artifact_location=f"file://{folder / 'mlartifacts'}")
    cell_mean = {}
    for (lr, temp, _), values in SEARCH.items():
        cell_mean.setdefault((lr, temp), []).append(values[0])
    for i, ((lr, temp, seed), (rung, knn, linear, saved)) in enumerate(SEARCH.items()):
        tags = {"dinolab.kind": "run", "axis.optim.lr": str(lr), "axis.teacher.temp": str(temp),
                "dinolab.seed": str(seed), "dinolab.search.rung0": str(rung),
                "dinolab.search.metric": "monitor_knn_top1", "dinolab.search.mode": "max",
                "dinolab.search.rungs": "0.2,1.0"}  # fmt: skip
        pruned = saved is not None
        if pruned:
            tags.update({"dinolab.search.pruned_at": "0.2", "dinolab.search.saved_gpu_hours": str(saved),
                         "dinolab.search.cell_value": str(sum(cell_mean[lr, temp]) / len(cell_mean[lr, temp]))})  # fmt: skip
            if not revived:
                tags["dinolab.state"] = "pruned"
            elif i % 3:  # launcher/halving.py:revive tags "revived"; any state but pruned is not pruned
                tags["dinolab.state"] = ("revived", "completed")[i % 3 - 1]
        rid = client.create_run(exp, run_name=f"lr{lr}-t{temp}-s{seed}", tags=tags).info.run_id
        metrics = [
            Metric("monitor_knn_top1", rung, 0, 20),
            Metric("gpu_hours", 0.2, 0, 20),
            Metric("loss", 5.0, 0, 20),
        ]
        if not pruned or revived:
            metrics += [Metric("knn_top1_k20", knn, 0, 100), Metric("linear_top1", linear, 0, 100),
                        Metric("gpu_hours", 1.0, 0, 100)]  # fmt: skip
        elif (lr, temp, seed) == PRUNED_WITH_KNN:
            metrics.append(Metric("knn_top1_k20", 99.0, 0, 20))
        client.log_batch(rid, metrics=metrics, params=[Param("train.seed", str(seed))])
        client.set_terminated(rid, "FINISHED")  # a pruned run's MLflow run ends too: only its tag says pruned


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


def report_here(capsys, *args: str) -> tuple[int, str, str]:
    """`dinolab report ARGS` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from launcher.cli import main

    capsys.readouterr()
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def first_table(markdown: str) -> list[list[str]]:
    """The cells of the first Markdown table's body rows."""
    lines = markdown.split("\n\n")[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


CELL = re.compile(r"^(\*\*)?\d+\.\d+(\*\*)? \[\d+\.\d+, \d+\.\d+\] \((n=\d+|1 seed)(, \d+ left out)?\)$")


def test_markdown_table_matches_golden(fake_sweep):
    out = report(fake_sweep, "--paper", "--vs", "crops.num_local=0", "--resolve", "0.5", "--runs").stdout
    check_golden("report.md", out)
    # --runs: each run links its repro.json in its run folder; one code (none recorded): no warning
    assert "| [repro.json](</runs/multicrop-fake/nl0-s1-id01/repro.json>) |" in out
    assert "mixed code" not in out
    rows = first_table(out)
    # The collapsed run of num_local=0 is counted once, not among the finished, and left out of the mean.
    assert rows[0][0] == "0" and rows[0][-1] == "2 finished; 1 collapsed (uniform)"
    assert rows[0][1].startswith("61.9 [") and rows[0][1].endswith("(n=2, 1 left out)")
    assert rows[2][-1] == "2 finished, 1 running" and rows[2][1].endswith("(n=2)")
    assert all(CELL.match(row[1]) for row in rows), [
        row[1] for row in rows
    ]  # every k-NN cell: interval, seeds
    assert not any("**" in row[1] for row in rows)  # 2 seeds apart: no best resolved
    assert rows[1][2].endswith("not resolved") and rows[0][2] == "reference"
    assert rows[3][0] == "random init" and rows[3][1].startswith("56.0 [")
    assert (
        "Selected on: k-NN top-1 (k=20): k fixed at 20, nothing chosen; linear top-1: final epoch; lr chosen on the held-out 0.1"
        in out
    )
    assert "Seeds to resolve a difference of 0.5 points with 80% power" in out


@pytest.mark.parametrize(
    "fmt, golden", [("latex", "report.tex"), ("html", "report.html"), ("csv", "report.csv")]
)
def test_latex_html_and_csv_tables_match_golden(fake_sweep, capsys, fmt, golden):
    runs = ("--runs",) if fmt != "csv" else ()  # the runs table with its repro.json links
    code, out, err = report_here(capsys, "--experiment", "multicrop-fake", "--tracking-uri", fake_sweep,
                                 "--format", fmt, "--vs", "crops.num_local=0", *runs)  # fmt: skip
    assert code == 0, err
    check_golden(golden, out)
    link = {"latex": "\\texttt{/runs/multicrop-fake/nl6-s2-id62/repro.json}",
            "html": '<a href="file:///runs/multicrop-fake/nl6-s2-id62/repro.json">repro.json</a>'}  # fmt: skip
    assert fmt == "csv" or link[fmt] in out
    if fmt == "csv":
        import io

        import pandas as pd

        table = pd.read_csv(io.StringIO(out))
        assert {"ci_low", "ci_high", "n_seeds", "n_test", "diff", "p_holm", "resolved"} <= set(table.columns)
        knn = table[table["metric"] == "knn_top1@20"].set_index("crops.num_local")
        assert (
            knn.loc["0", "n_seeds"] == 2
            and knn.loc["0", "n_left_out"] == 1
            and knn.loc["0", "n_test"] == 1000
        )
        assert (knn["ci_low"] < knn["mean"]).all() and (knn["mean"] < knn["ci_high"]).all()


def test_a_sweep_files_baseline_is_the_default_reference_and_resolve_prices_seeds_with_the_cost_estimate(
    fake_sweep, capsys, tmp_path
):
    sweep = tmp_path / "multicrop-fake.yaml"
    text = (f"name: multicrop-fake\nroot: {Path(fake_sweep.removeprefix('sqlite:///')).parent}\n"
            "base: [model=vit_test, data=synthetic, data.image_size=32, train.device=cpu]\n"
            "grid: {crops.num_local: [0, 2, 6]}\nseeds: [0, 1, 2]\n")  # fmt: skip
    sweep.write_text(text + "baseline: {crops.num_local: 2}\n")
    code, out, err = report_here(capsys, str(sweep), "--resolve", "2")
    assert code == 0, err
    rows = first_table(out)
    assert rows[1][2] == "reference" and rows[0][2].startswith("-4.4 [")  # nl0 - nl2 over seeds 0 and 2
    plan = out[out.index("Seeds to resolve a difference of 2 points") :]
    assert "α = 0.05/2 = 0.025" in plan and "pooled over the cells' seeds, 4 df" in plan
    assert "estimate (" in plan and "launcher/cost" in plan  # priced by the sweep's cost estimate

    code, out, _ = report_here(capsys, str(sweep), "--vs", "none")
    assert code == 0 and " vs " not in out.split("\n\n")[0]

    sweep.write_text(text + "baseline: {crops.num_local: 3}\n")
    code, _, err = report_here(capsys, str(sweep))
    assert code == 2 and "baseline.crops.num_local: 3 is not one of its values (0, 2, 6)" in err
    sweep.write_text(text + "baseline: {crops.num_locals: 2}\n")
    code, _, err = report_here(capsys, str(sweep))
    assert code == 2 and "baseline.crops.num_locals: not an axis of the sweep" in err


def test_a_figure_chosen_on_its_test_split_is_refused_by_name(fake_sweep, capsys):
    code, _, err = report_here(capsys, "--experiment", "multicrop-fake", "--tracking-uri", fake_sweep,
                               "--metric", "linear_best_top1")  # fmt: skip
    assert code == 2 and err.startswith(
        "dinolab report: error: --metric linear_best_top1: the best epoch's top-1 is chosen on the test split"
    )
    code, _, err = report_here(capsys, "--experiment", "multicrop-fake", "--tracking-uri", fake_sweep,
                               "--vs", "crops.num_local=3")  # fmt: skip
    assert code == 2 and "--vs crops.num_local=3: no cell has crops.num_local=3 (values: 0, 2, 6)" in err


def test_the_quickstarts_report_bolds_nothing_collapsed_or_unresolved(tmp_path, capsys):
    """The quickstart's shape (sweeps/quickstart.yaml): teacher.momentum x (crops.num_local,
    optim.batch_size), one seed; both momentum-0.9 runs collapsed to uniform, one of them with the best
    k-NN. Nothing is bold, every number has its interval or says "1 seed", no difference is resolved."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("quickstart", artifact_location=f"file://{tmp_path / 'mlartifacts'}")
    for (m, nl, bs, knn, ips) in ((0.996, 0, 32, 67.3, 434), (0.996, 2, 24, 66.7, 274), (0.9, 0, 32, 67.3, 344),
                                  (0.9, 2, 24, 71.5, 200)):  # fmt: skip
        rid = client.create_run(exp, run_name=f"m{m}-nl{nl}", tags={
            "dinolab.kind": "run", "axis.teacher.momentum": str(m), "axis.crops.num_local": str(nl),
            "axis.optim.batch_size": str(bs), "dinolab.seed": "0"}).info.run_id  # fmt: skip
        entropy = math.log(1024) - 0.001 if m == 0.9 else 5.0
        client.log_batch(rid, metrics=[Metric("knn_top1_k20", knn, 0, 128), Metric("teacher_entropy", entropy, 0, 128),
                                       Metric("avg_img_per_s", ips, 0, 128), Metric("loss", 7.0, 0, 128)],
                         params=[Param("head.out_dim", "1024"), Param("train.seed", "0")])  # fmt: skip
        record = tmp_path / f"{rid}.json"
        record.write_text(json.dumps({"protocol": "knn", "baseline": "none", "num_test": 1000, "time": 1}))
        client.log_artifact(rid, str(record), "eval/knn")
        client.set_terminated(rid, "FINISHED")
    code, out, err = report_here(capsys, "--experiment", "quickstart", "--tracking-uri", uri,
                                 "--vs", "teacher.momentum=0.996")  # fmt: skip
    assert code == 0, err
    table = out.split("\n\n")[0]
    assert "**" not in table
    rows = first_table(out)  # by crops.num_local, optim.batch_size, teacher.momentum
    assert [r[3] for r in rows] == ["— (1 left out)", "67.3 [64.3, 70.1] (1 seed)", "— (1 left out)",
                                    "66.7 [63.7, 69.6] (1 seed)"]  # fmt: skip
    assert [r[-1] for r in rows] == ["1 collapsed (uniform)", "1 finished"] * 2
    assert [r[4] for r in rows] == ["— (no healthy seed)", "reference"] * 2
    assert [r[6] for r in rows] == ["—", "434 (1 seed)", "—", "274 (1 seed)"]


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


def test_html_page_holds_tables_and_plots(fake_sweep, tmp_path):
    report(fake_sweep, "--html", str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text()
    # metric vs axis; the monitor's k-NN curves, k-NN, loss, entropy per run
    assert page.count("data:image/png;base64,") == 5 and "k-NN top-1 during pretraining" in page
    assert page.count("<table") == 2 and "nl6-s2" in page and "collapsed (uniform)" in page
    assert "random init dashed" in page and "<p class='note'>Cells: mean over the healthy seeds" in page
    assert '<a href="file:///runs/multicrop-fake/nl0-s0-id00/repro.json">repro.json</a>' in page
    assert "mixed code" not in page


MIXED = ("the runs of this table trained with 2 different code versions: code c0de1 (2 runs), c0de2 (1 run); "
         "1 run(s) without a code hash not compared.")  # fmt: skip


def test_a_table_whose_runs_used_different_code_is_flagged_in_every_format(fake_sweep, capsys):
    args = ("--experiment", "mixed-code", "--tracking-uri", fake_sweep)
    code, out, err = report_here(capsys, *args, "--runs")
    assert code == 0, err
    assert (
        out.startswith(f"> **Warning: mixed code.** T{MIXED[1:]}")
        and f"dinolab report: warning: mixed code: {MIXED}" in err
    )
    runs = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| nl")}
    assert "| —  " in runs["nl2-s1"]  # no code hash recorded
    assert (
        "| c0de2 " in runs["nl2-s0"]
        and "[repro.json](</runs/mixed-code/nl2-s0/repro.json>)" in runs["nl2-s0"]
    )
    assert "[repro.json](<runs/default/repro.json>)" in runs["nl2-s1"]  # the run.dir param of a lone run
    code, out, err = report_here(capsys, *args, "--format", "latex")
    assert code == 0 and out.startswith(f"% dinolab report: warning: mixed code: {MIXED} A difference")
    assert "\\textbf{Warning: mixed code.} The runs of this table trained with 2" in out
    code, out, err = report_here(capsys, *args, "--format", "html")
    assert code == 0 and out.startswith("<p class='warning'><b>Warning: mixed code.</b> The runs of this")
    code, out, err = report_here(capsys, *args, "--format", "csv")
    assert (
        code == 0 and "mixed code" in err and out.startswith("crops.num_local,kind,metric")
    )  # CSV stays CSV


@pytest.mark.parametrize(
    "hashes, flagged",
    [(["a", "a", None], False), (["a", None, None], False), ([None, None], False), (["a", "b", "b"], True)],
)
def test_runs_without_a_code_hash_are_not_counted_as_different(hashes, flagged):
    import pandas as pd

    from reports.tables import mixed_code

    warning = mixed_code(pd.DataFrame({"code_hash": hashes}))
    assert bool(warning) == flagged
    assert not flagged or warning.startswith(
        "the runs of this table trained with 2 different code versions: code b (2 runs), a (1 run)"
    )


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


@pytest.mark.heavy
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


# ---- a successive-halving search (SEARCH above) ------------------------------------------------------


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's ρ by the textbook formula for values without ties: 1 − 6 Σd² / (n (n² − 1))."""
    rank_x = {x: i for i, x in enumerate(sorted(xs))}
    rank_y = {y: i for i, y in enumerate(sorted(ys))}
    n = len(xs)
    return 1 - 6 * sum((rank_x[x] - rank_y[y]) ** 2 for x, y in zip(xs, ys, strict=True)) / (n * (n * n - 1))


def pruned_cells() -> list[tuple[float, float, float, int, float]]:
    """(lr, temp, mean at the rung, seeds, GPU-hours saved) of each pruned cell of SEARCH, best first."""
    cells: dict[tuple, list] = {}
    for (lr, temp, _), (rung, _, _, saved) in SEARCH.items():
        if saved is not None:
            cells.setdefault((lr, temp), []).append((rung, saved))
    found = [
        (lr, t, sum(r for r, _ in v) / len(v), len(v), sum(s for _, s in v)) for (lr, t), v in cells.items()
    ]
    return sorted(found, key=lambda c: -c[2])


ENDED = [values for values in SEARCH.values() if values[3] is None]  # trained to the end in search-fake
FEW = ("Too few runs reached the end to judge the rung (n=3); revive the pruned runs with "
       "`dinolab sweep submit FILE --only pruned` to measure it")  # fmt: skip
LOW = ("The rung metric does not rank runs like the final evaluation: pruning at this rung may drop the best "
       "cells; use a later rung")  # fmt: skip


def search_report(capsys, uri: str, experiment: str, *args: str) -> tuple[str, str]:
    code, out, err = report_here(capsys, "--experiment", experiment, "--tracking-uri", uri, *args)
    assert code == 0, err
    return out, err


def test_a_searchs_pruned_runs_are_no_results_and_are_listed_apart_one_row_per_cell(fake_sweep, capsys):
    out, _ = search_report(capsys, fake_sweep, "search-fake", "--runs")
    blocks = out.split("\n\n")
    ended = sorted((lr, t, v[1]) for (lr, t, _), v in SEARCH.items() if v[3] is None)
    rows = first_table(out)  # the ablation table: the 3 cells that reached the end, nothing left out
    assert [(float(r[0]), float(r[1]), r[2], r[-1]) for r in rows] == [
        (lr, t, f"{knn:.1f} (1 seed)", "1 finished") for lr, t, knn in ended
    ]
    pivot = next(b for b in blocks if b.startswith("| optim.lr   | teacher.temp=0.04"))
    assert "99.0" not in blocks[0] + pivot and "left out" not in blocks[0]  # the pruned run's k-NN: no result
    assert "7 run(s) pruned by successive halving trained only to a rung: never results" in out
    runs = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| lr")}
    assert len(runs) == len(SEARCH)  # --runs: every run, a pruned one with its state
    assert sum("| pruned " in line for line in runs.values()) == 7
    at = blocks.index(
        "Pruned by successive halving (monitor_knn_top1, higher is better; rungs 0.2, 1.0): never results, "
        "left out of the table, its statistics and plots:"
    )
    cut = [[c.strip() for c in line.strip("|").split("|")] for line in blocks[at + 1].splitlines()[2:]]
    assert cut == [
        [str(lr), str(t), "0.2 of the schedule", f"{mean:.4g}", str(seeds), f"{saved:.3g}"]
        for lr, t, mean, seeds, saved in pruned_cells()
    ]
    assert cut[0][3:5] == ["48.5", "2"]  # the cell of two seeds, pruned together on their mean
    total = sum(c[4] for c in pruned_cells())
    assert (
        blocks[at + 2].strip()
        == f"6 cells pruned, {total:.3g} GPU-hours saved"
        == "6 cells pruned, 8.4 GPU-hours saved"
    )


def test_the_rung_is_judged_by_its_spearman_correlation_with_the_final_metric(fake_sweep, capsys):
    out, err = search_report(capsys, fake_sweep, "search-fake")
    rho = spearman([v[0] for v in ENDED], [v[1] for v in ENDED])  # rung value, final k-NN
    line = f"rung 0.2 (monitor_knn_top1) → final k-NN top-1 (k=20): Spearman ρ = {rho:.2f} over 3 runs"
    assert f"\n\n{line}\n\n> **Warning: rung 0.2.** {FEW}\n\n" in out  # under the table, n < 5 warned
    assert f"dinolab report: warning: rung 0.2: t{FEW[1:]}" in err and "does not rank" not in out

    # Revived with --only pruned: every run ended (dinolab.state revived, completed or none), rung tags kept.
    out, err = search_report(capsys, fake_sweep, "search-revived")
    rho = spearman([v[0] for v in SEARCH.values()], [v[1] for v in SEARCH.values()])
    assert rho >= 0.5 and f"Spearman ρ = {rho:.2f} over 10 runs\n" in out
    assert "Warning" not in out and "warning: rung" not in err
    assert "Pruned by successive halving" not in out and len(first_table(out)) == 9  # nothing pruned any more

    out, err = search_report(capsys, fake_sweep, "search-revived", "--metric", "linear_top1")
    rho = spearman([v[0] for v in SEARCH.values()], [v[2] for v in SEARCH.values()])
    assert (
        rho < 0.5
        and f"→ final linear top-1: Spearman ρ = {rho:.2f} over 10 runs\n\n> **Warning: rung 0.2.** {LOW}"
        in out
    )
    assert f"dinolab report: warning: rung 0.2: t{LOW[1:]}" in err and "Too few" not in out


@pytest.mark.parametrize("fmt", ["latex", "html", "csv"])
def test_a_searchs_report_in_every_format(fake_sweep, capsys, fmt):
    out, _ = search_report(capsys, fake_sweep, "search-fake", "--format", fmt)
    rho = spearman([v[0] for v in ENDED], [v[1] for v in ENDED])
    total = sum(c[4] for c in pruned_cells())
    lr, t, mean, seeds, saved = pruned_cells()[0]
    if fmt == "latex":
        table = out[: out.index("\\end{tabular}")]
        assert table.count("1 finished") == 3 and "99.0" not in table
        assert ("\\par\\smallskip{\\footnotesize rung 0.2 (monitor\\_knn\\_top1) $\\rightarrow$ final k-NN top-1 "
                f"(k=20): Spearman $\\rho$ = {rho:.2f} over 3 runs}}") in out  # fmt: skip
        assert "\\textbf{Warning: rung 0.2.} Too few runs reached the end to judge the rung (n=3)" in out
        assert "\\texttt{dinolab sweep submit FILE --only pruned}" in out
        assert f"{lr} & {t} & 0.2 of the schedule & {mean:.4g} & {seeds} & {saved:.3g} \\\\" in out
        assert f"\\par\\smallskip{{\\footnotesize 6 cells pruned, {total:.3g} GPU-hours saved}}" in out
    elif fmt == "html":
        table = out[: out.index("</table>")]
        assert table.count("1 finished") == 3 and "99.0" not in table
        assert (f"<p class='note'>rung 0.2 (monitor_knn_top1) → final k-NN top-1 (k=20): Spearman ρ = {rho:.2f} "
                "over 3 runs</p>\n<p class='warning'><b>Warning: rung 0.2.</b> Too few runs") in out  # fmt: skip
        assert (
            f"<td>{lr}</td>\n      <td>{t}</td>\n      <td>0.2 of the schedule</td>\n      <td>{mean:.4g}</td>"
            in out
        )
        assert f"<p class='note'>6 cells pruned, {total:.3g} GPU-hours saved</p>" in out
    else:
        import io

        import pandas as pd

        table, cut, ranked = (pd.read_csv(io.StringIO(block)) for block in out.strip().split("\n\n"))
        knn = table[table["metric"] == "knn_top1@20"]
        ended = sorted((lr, t, v[1]) for (lr, t, _), v in SEARCH.items() if v[3] is None)
        assert list(zip(knn["optim.lr"], knn["teacher.temp"], knn["mean"], strict=True)) == ended
        assert (knn["n_seeds"] == 1).all() and (
            knn["n_left_out"] == 0
        ).all()  # the pruned: no seed, none left out
        cells = cut[cut["kind"] == "pruned cell"]
        assert [tuple(r) for r in cells[["optim.lr", "teacher.temp", "cell_value", "n_seeds", "saved_gpu_hours"]]
                .itertuples(index=False)] == [pytest.approx(c) for c in pruned_cells()]  # fmt: skip
        assert (cells["pruned_at"] == 0.2).all() and (cut["metric"] == "monitor_knn_top1").all()
        (last,) = cut[cut["kind"] == "total"].itertuples()
        assert last.n_seeds == 7 and last.saved_gpu_hours == pytest.approx(total)
        (row,) = ranked.itertuples()
        assert (row.rung, row.rung_fraction, row.final_metric, row.n_runs) == (0, 0.2, "knn_top1@20", 3)
        assert row.spearman_rho == pytest.approx(rho, abs=1e-6) and row.warning.startswith("too few runs")


def test_the_html_page_of_a_search_plots_no_pruned_run(fake_sweep, capsys, tmp_path, monkeypatch):
    from reports import plots

    plotted: dict[str, object] = {}

    def curves(histories, label, hline=None):
        plotted[label] = sorted(histories)
        return b"png"

    def metric_vs_axis(summary, by, metric, label):
        plotted["cells"] = len(summary)
        return b"png"

    monkeypatch.setattr(plots, "curves", curves)
    monkeypatch.setattr(plots, "metric_vs_axis", metric_vs_axis)
    search_report(capsys, fake_sweep, "search-fake", "--html", str(tmp_path / "page.html"))
    page = (tmp_path / "page.html").read_text()
    ended = sorted(f"lr{lr}-t{t}-s{s}" for (lr, t, s), v in SEARCH.items() if v[3] is None)
    assert plotted.pop("cells") == 3 and plotted and all(runs == ended for runs in plotted.values())
    assert (
        "<h2>Pruned by successive halving</h2><p class='note'>Pruned by successive halving (monitor_knn_top1"
        in page
    )
    assert "<p class='note'>6 cells pruned, 8.4 GPU-hours saved</p>" in page
    assert "Spearman ρ = 0.50 over 3 runs</p>" in page and "<b>Warning: rung 0.2.</b> Too few" in page
    assert "<td>lr0.0001-t0.06-s0</td>" in page and "<td>pruned</td>" in page  # the runs table: every run
    assert "10 runs" not in page and "3 runs; means over healthy runs only. 7 run(s) pruned" in page


def test_a_sweep_without_a_search_gets_no_search_columns(fake_sweep):
    from reports.collect import collect

    plain, searched = collect(fake_sweep, "multicrop-fake"), collect(fake_sweep, "search-fake")
    assert "search" not in plain.attrs and not any(c.startswith("search:") for c in plain.columns)
    assert searched.attrs["search"] == {"metric": "monitor_knn_top1", "mode": "max", "rungs": [0.2, 1.0]}
    assert (searched["state"] == "pruned").sum() == 7 and searched["search:rung0"].notna().all()
