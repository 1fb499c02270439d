"""A sweep on submitit's local executor where one run collapses (issue 21's acceptance): it stops early
as `collapsed`, its k-NN job is skipped with the reason, `status`, `submit` and `report` say so, and
the healthy run of the same sweep completes with its k-NN result."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from launcher import records
from tests.integration.cli import dinolab
from tests.integration.test_collapse_cli import COLLAPSING

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

# The healthy run keeps the defaults (momentum teacher, centring): its KL stays 0.3-2 nats. The other
# has neither, the no-momentum row of the paper's Table 7 made quick: one dimension by step 4.
BASE = [
    "model=vit_test", "data=synthetic", "data.num_samples=64", "data.image_size=32", "optim.batch_size=8",
    "optim.epochs=2", "train.device=cpu", "train.checkpoint_every_minutes=0",
    *(o for o in COLLAPSING if not o.startswith("teacher.")),
]  # fmt: skip


def test_a_collapsed_run_stops_early_and_skips_its_knn_while_the_healthy_one_completes(tmp_path, capsys):
    sweep = tmp_path / "collapse.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "collapse", "root": str(tmp_path / "sweeps"), "base": BASE,
        "zip": {"teacher.momentum": [0.996, 0.0], "teacher.center_momentum": [0.9, 1.0]},
        "short_names": {"teacher.momentum": "m", "teacher.center_momentum": "cm"},
        "array_parallelism": 2, "evals": ["knn"], "eval_overrides": {"knn": ["knn.max_test=64"]},
        "resources": {"pretrain": {"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20},
                      "knn": {"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20}},
    }))  # fmt: skip
    proc = dinolab("sweep", "run", str(sweep), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "sweeps" / "collapse"
    dirs = {
        p.name.rsplit("-", 1)[0]: p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != "code"
    }
    healthy, collapsed = dirs["cm0.9-m0.996"], dirs["cm1.0-m0.0"]

    rec = records.read_record(str(collapsed))
    assert rec["state"] == records.COLLAPSED and rec["step"] == rec["collapse_step"] == 8
    assert rec["total_steps"] == 16 and rec["collapse_signal"].startswith("one dimension: entropy 0.000")
    knn = json.loads((collapsed / "record-knn.json").read_text())
    assert knn["state"] == "skipped" and knn["reason"].startswith(
        "pretraining collapsed at step 8: one dimension"
    )
    assert not (collapsed / "eval").exists()  # no evaluation ran

    rec = records.read_record(str(healthy))
    assert rec["state"] == records.COMPLETED and rec["step"] == 16 and rec["evals"] == {"knn": "completed"}
    (result,) = (healthy / "eval" / "knn").glob("*.json")
    assert json.loads(result.read_text())["step"] == 16

    # `sweep run` ended with the status table (rich folds its long note over lines: read the same
    # table unfolded); `submit` treats the collapsed run as done.
    assert "1 collapsed, 1 completed" in proc.stdout and "skipped (collapsed)" in proc.stdout
    from launcher.cli import main  # in this process: no second start-up of Python, torch and MLflow
    from launcher.commands.sweep import plain
    from launcher.grid import expand
    from launcher.status import status_table
    from launcher.sweep_file import load_sweep

    loaded = load_sweep(sweep)
    (row,) = [
        line for line in plain(status_table(loaded, expand(loaded))).splitlines() if "cm1.0-m0.0" in line
    ]
    assert " collapsed " in row and "collapsed at step 8: one dimension: entropy 0.000" in row

    capsys.readouterr()
    assert main(["sweep", "submit", str(sweep)]) == 0
    again = capsys.readouterr().out
    assert "submitted 0 pretraining job(s)" in again and "evaluation job" not in again
    assert "skip (collapsed at step 8)" in again and "skip (finished)" in again

    # MLflow: FINISHED with dinolab.state=collapsed; the report lists it with the GPU-hours saved.
    capsys.readouterr()
    code = main(["report", str(sweep), "--metric", "loss"])
    out = capsys.readouterr().out
    # Counted once, as how it ended (its final entropy), not also as "1 collapsed".
    assert code == 0 and "| 1 collapsed (one dimension)" in out and "collapsed;" not in out
    assert "Stopped early by the collapse guard" in out
    assert re.search(
        r"\| cm1\.0-m0\.0 +\| 8 +\| 16 +\| [0-9.e-]+ +\| [0-9.e-]+ +\| collapsed \(one dimension\)", out
    )
    from reports.collect import collect

    df = collect(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}", "collapse").set_index("run")
    row = df.loc["cm1.0-m0.0"]
    assert (row["state"], row["collapse_step"], row["total_steps"]) == ("collapsed", 8, 16)
    assert df.loc["cm0.9-m0.996", "state"] == "finished"


def test_report_lists_collapsed_runs_with_the_gpu_hours_saved(capsys, tmp_path):
    """saved = spent x (planned - stopped) / stopped steps."""
    import pandas as pd

    from reports.tables import collapsed_table

    df = pd.DataFrame({"run": ["a", "b"], "state": ["collapsed", "finished"], "gpu_hours": [0.5, 1.0],
                       "collapse_step": [250, float("nan")], "total_steps": [1000, 1000], "flag": ["", ""]})  # fmt: skip
    table = collapsed_table(df, "markdown")
    assert "| a " in table and "| b " not in table
    row = table.splitlines()[-1]
    assert "| 250 " in row and "| 1000 " in row and "| 0.5 " in row and "| 1.5 " in row
    assert collapsed_table(df.iloc[1:], "markdown") == ""
