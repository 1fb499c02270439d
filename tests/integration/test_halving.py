"""Successive halving as a user runs it: a 3x3 grid of tiny runs, rungs [0.25, 1.0], keep 3.

Local executor (`sweep run`, full tier): 9 runs train to 25 %, the rung's decision job keeps 3 cells,
the 3 train on from their rung checkpoint and are evaluated, 6 end `pruned`; a resubmit submits
nothing; a promoted run is bitwise equal to an uninterrupted twin; `--only pruned` trains a pruned
one on. On the local SLURM cluster (the issue's acceptance): the same with each rung a job array and
its decision a job started by the array's end, and the CPU-hours spent against the plan's estimate.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from launcher import records
from tests.conftest import load_final
from tests.integration.cli import REPO, dinolab, env, results
from tests.integration.slurm_cluster import slurm_cluster  # noqa: F401
from tests.integration.test_sweep_slurm import wait_for

BASE = ["model=vit_test", "data=synthetic", "data.num_samples=64", "data.image_size=32", "optim.batch_size=8",
        "train.workers=0", "train.device=cpu", "train.checkpoint_every_steps=0", "train.checkpoint_every_minutes=0",
        "monitor.knn_train=64", "monitor.knn_test=32"]  # fmt: skip
GRID = {"optim.lr": [0.0005, 0.005, 0.05], "teacher.momentum": [0.9, 0.99, 0.996]}


def _write(tmp_path, epochs: int, log_every: int, **extra) -> tuple:
    sweep = tmp_path / "hv.yaml"
    raw = {"name": "hv", "root": str(tmp_path / "runs"), "base": [*BASE, f"optim.epochs={epochs}",
           f"train.log_every={log_every}"], "grid": GRID, "short_names": {"optim.lr": "lr", "teacher.momentum": "m"},
           "evals": ["knn"], "eval_overrides": {"knn": ["knn.max_test=32", "workers=0", "device=cpu"]},
           "search": {"strategy": "halving", "metric": "monitor_knn_top1", "rungs": [0.25, 1.0], "keep": 3},
           **extra}  # fmt: skip
    sweep.write_text(yaml.safe_dump(raw, sort_keys=False))
    return sweep, tmp_path / "runs" / "hv"


def _runs(folder) -> dict[str, dict]:
    return {p.name: records.read_record(str(p)) for p in folder.iterdir() if (p / "record.json").exists()}


def _twin(run_dir, folder, tmp_path) -> None:
    """The same config trained without pause, as `dinolab train` (one thread, as the jobs): equal."""
    overrides = json.loads((folder / "manifest.json").read_text())["runs"]
    (spec,) = [r for r in overrides if run_dir.name.endswith(r["run_id"])]
    twin = tmp_path / "twin"
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "train", *spec["overrides"], f"run.dir={twin}",
                           "train.progress=false"], capture_output=True, text=True, cwd=REPO,
                          env={**env(), "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_final(twin), load_final(run_dir)
    assert a["step"] == b["step"]
    for part in ("student", "teacher"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part


def _check_search(folder) -> tuple[list, list]:
    """3 runs completed and evaluated from their rung checkpoint, 6 pruned at it; the decision."""
    runs = _runs(folder)
    done = sorted(n for n, r in runs.items() if r["state"] == "completed")
    pruned = sorted(n for n, r in runs.items() if r["state"] == "pruned")
    assert len(done) == 3 and len(pruned) == 6, {n: r["state"] for n, r in runs.items()}
    decision = json.loads((folder / "search.json").read_text())["rungs"]["0"]
    kept = [c for c in decision["cells"] if c["kept"]]
    assert len(kept) == 3 and min(c["value"] for c in kept) >= max(c["value"] for c in decision["cells"][3:])
    for name in done:
        steps = sorted(int(p.name) for p in (folder / name / "checkpoints").iterdir())
        assert steps[0] == runs[name]["rungs"]["0.25"]["step"] and steps[-1] == runs[name]["total_steps"]
        assert f"resumed from {folder / name}/checkpoints/" in (folder / name / "train.log").read_text()
        assert results(folder / name, "knn")  # evaluated once at the end
    for name in pruned:
        record = runs[name]
        assert [int(p.name) for p in (folder / name / "checkpoints").iterdir()] == [
            record["rungs"]["0.25"]["step"]
        ]
        assert record["pruned_at"] == 0.25 and record["saved_gpu_hours"] > 0
        assert not (folder / name / "eval" / "knn").exists()  # pruned: never evaluated
    return done, pruned


@pytest.mark.slow
@pytest.mark.heavy
def test_a_halving_search_on_the_local_executor(tmp_path):
    sweep, folder = _write(tmp_path, epochs=4, log_every=4, array_parallelism=2)
    plan = dinolab("sweep", "plan", str(sweep))
    assert plan.returncode == 0, plan.stderr
    assert "new to 25%" in plan.stdout and "9 → 3 cells; expected" in plan.stdout
    run = dinolab("sweep", "run", str(sweep))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "submitted the decision of rung 0" in run.stdout
    done, pruned = _check_search(folder)
    assert re.search(r"3 completed, 6 pruned", run.stdout), run.stdout  # `sweep run` waited for the search

    again = dinolab("sweep", "submit", str(sweep))
    assert again.returncode == 0 and "submitted 0 pretraining job(s)" in again.stdout, again.stdout
    assert "submitted the decision" not in again.stdout
    assert len(re.findall(r"^skipped .*: pruned at 25%$", again.stdout, re.M)) == 6

    status = dinolab("sweep", "status", str(sweep), "--wide")
    assert status.stdout.count("│ pruned ") == 6 and status.stdout.count("at 25%:") == 6

    _twin(folder / done[0], folder, tmp_path)

    revive = dinolab("sweep", "run", str(sweep), "--only", "pruned", "--run", pruned[0])
    assert revive.returncode == 0, revive.stderr[-3000:]
    record = records.read_record(str(folder / pruned[0]))
    assert record["state"] == "completed" and results(folder / pruned[0], "knn")
    assert sorted(n for n, r in _runs(folder).items() if r["state"] == "pruned") == pruned[1:]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_halving_search_on_slurm_prunes_six_of_nine_and_spends_what_the_plan_said(slurm_cluster, tmp_path):  # noqa: F811
    res = {"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 30,
           "setup": ["export OMP_NUM_THREADS=1"]}  # fmt: skip
    sweep, folder = _write(tmp_path, epochs=20, log_every=16, array_parallelism=4,
                           resources={"pretrain": res, "knn": res})  # fmt: skip
    sub = dinolab("sweep", "submit", str(sweep), "--executor", "slurm")
    assert sub.returncode == 0, sub.stderr
    assert "submitted 9 pretraining job(s)" in sub.stdout and "submitted the decision of rung 0" in sub.stdout

    def settled():
        runs = _runs(folder)
        return len(runs) == 9 and all(
            r.get("state") == "pruned" or (r.get("state") == "completed" and r.get("evals", {}).get("knn") == "completed")
            for r in runs.values()
        )  # fmt: skip

    wait_for(settled, 900, "the search to end", poll=3)
    done, pruned = _check_search(folder)
    state = json.loads((folder / "search.json").read_text())
    decider = state["deciders"]["0"]["job_id"]
    dependency = subprocess.run(["sacct", "-n", "-X", "-P", "-j", decider, "-o", "State"], capture_output=True,
                                text=True).stdout  # fmt: skip
    assert "COMPLETED" in dependency
    for name in done:  # each rung an array: the rung-0 array, then one array of the 3 promoted runs
        jobs = records.read_jobs(str(folder / name))
        arrays = {j["job_id"].split("_")[0] for j in jobs if j["stage"] == "pretrain"}
        assert len(arrays) == 2, jobs
    # CPU-hours spent by pretraining (the records' gpu_hours: the kept steps' wall seconds, the monitor
    # and each job's warm-up) against the plan's estimate of the search's pretraining, its speed and
    # each job's fixed seconds now measured by these runs (before the twins, which train alone on the
    # machine, add their faster figures to the store), and against the full grid's, as the 3 runs
    # that went to the end measure a whole run (each paused once) and as the plan estimates it.
    states = _runs(folder)
    spent = sum(r.get("gpu_hours") or 0.0 for r in states.values())
    whole = sum(states[n]["gpu_hours"] for n in done) / len(done)
    plan = dinolab("sweep", "plan", str(sweep))
    line = next(x for x in plan.stdout.splitlines() if x.startswith("search:"))
    found = re.search(r"expected (\S+) GPU-hours \(pretrain (\S+)\) against (\S+)", line)
    expected, pretrain, full = (float(v) for v in found.groups())
    print(f"spent {spent:.5f} CPU-hours pretraining, {spent / (9 * whole):.0%} of the full grid's "
          f"{9 * whole:.5f} as measured; plan: {line}")  # fmt: skip
    assert "+ " in plan.stdout and " s per job" in plan.stdout  # the measured speed counts each job's start
    assert abs(spent - pretrain) <= 0.1 * pretrain, (spent, pretrain)
    assert spent < 0.7 * 9 * whole and expected < full

    for name in done:
        _twin(folder / name, folder, tmp_path / name)
