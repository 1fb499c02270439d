"""`dinolab sweep` on submitit's local executor: the quickstart grid, shrunk, end to end."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from launcher import records
from tests.integration.cli import dinolab

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("fashion_mnist"),
]
# The quickstart sweep shrunk for CI: 192 images -> 6 or 8 steps per run; a 2000-image k-NN bank
# (the full 60,000 costs ~30 s of feature extraction per evaluation, and tests orchestration only).
SHRINK = ["data.limit=192", "eval_overrides.knn=[knn.max_train=2000]"]


def test_quickstart_sweep_runs_every_run_and_its_knn_then_resubmits_nothing(tmp_path, monkeypatch):
    root = tmp_path / "sweeps"
    monkeypatch.setenv("COLUMNS", "120")  # a 120-column terminal (for rich, as if it were one)
    proc = dinolab("sweep", "run", "sweeps/quickstart.yaml", f"root={root}", *SHRINK, timeout=1200)
    monkeypatch.delenv("COLUMNS")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "submitted 4 pretraining job(s)" in proc.stdout
        and "submitted 4 evaluation job(s) (knn)" in proc.stdout
    )
    run_dirs = sorted(
        p
        for p in (root / "quickstart").iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != "code"
    )
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        record = records.read_record(str(run_dir))
        assert record["state"] == "completed" and record["step"] == record["total_steps"] > 0
        assert record["evals"] == {"knn": "completed"}
        (result,) = (run_dir / "eval" / "knn").glob("*.json")
        knn = json.loads(result.read_text())
        assert knn["step"] == record["total_steps"] and 0 <= knn["top1"]["20"] <= 100
        assert (knn["num_train"], knn["num_test"]) == (2000, 1000)  # the file's and the edit's overrides
        jobs = records.read_jobs(str(run_dir))
        assert [j["stage"] for j in jobs] == ["pretrain", "knn"]
    assert proc.stdout.count("completed") >= 4
    # The progress bars and the final table of `sweep run` fit: a line per run in the table.
    assert max(map(len, proc.stdout.splitlines())) <= 120, proc.stdout
    assert sum(line.startswith("│") for line in proc.stdout.splitlines()) == 4, proc.stdout
    check_mlflow(root, run_dirs)

    again = dinolab("sweep", "submit", "sweeps/quickstart.yaml", f"root={root}", *SHRINK)
    assert again.returncode == 0, again.stderr
    assert "submitted 0 pretraining job(s)" in again.stdout and "evaluation job" not in again.stdout
    assert again.stdout.count("skip (finished)") == 4

    check_status(root, run_dirs, monkeypatch)
    logs = dinolab(
        "sweep",
        "logs",
        "sweeps/quickstart.yaml",
        f"root={root}",
        *SHRINK,
        "--run",
        run_dirs[0].name.rsplit("-", 1)[0],
    )
    assert logs.returncode == 0 and "log.out" in logs.stdout


def check_status(root, run_dirs, monkeypatch) -> None:
    """`sweep status` on a 120-column terminal: one line per run, none wider than the terminal, with
    the run, state, step, loss and k-NN columns; the axis columns (in the run names) only with --wide."""
    args = ["sweep", "status", "sweeps/quickstart.yaml", f"root={root}", *SHRINK]
    monkeypatch.setenv("COLUMNS", "120")
    status = dinolab(*args)
    assert status.returncode == 0 and "4 completed" in status.stdout, status.stderr[-2000:]
    lines = status.stdout.splitlines()
    assert max(map(len, lines)) <= 120, status.stdout
    (header,) = [line.split("┃")[1:-1] for line in lines if line.startswith("┃")]
    header = [h.strip() for h in header]
    assert header[:4] == ["run", "state", "step", "loss"] and "knn" in header and "seed" not in header
    assert "--wide also shows: teacher.momentum, crops.num_local, optim.batch_size, seed" in status.stdout
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 4, status.stdout  # nothing folded over a second line
    for run_dir in run_dirs:
        record = records.read_record(str(run_dir))
        (result,) = (run_dir / "eval" / "knn").glob("*.json")
        knn = json.loads(result.read_text())["top1"]["20"]
        (row,) = [r for r in rows if f"│ {run_dir.name.rsplit('-', 1)[0]} " in r]
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[1:3] == ["completed", f"{record['step']}/{record['total_steps']} (100%)"], row
        assert f"{record['loss']:.3f}" in cells and f"{knn:.1f}" in cells, row

    monkeypatch.setenv("COLUMNS", "400")
    wide = dinolab(*args, "--wide")
    assert wide.returncode == 0, wide.stderr[-2000:]
    (header,) = [line.split("┃")[1:-1] for line in wide.stdout.splitlines() if line.startswith("┃")]
    assert [h.strip() for h in header] == [
        "run", "teacher.momentum", "crops.num_local", "optim.batch_size", "seed", "state", "step", "loss",
        "GPU-h spent/est.", "requeues", "job", "code", "knn", "note",
    ]  # fmt: skip
    assert "--wide" not in wide.stdout
    monkeypatch.delenv("COLUMNS")


def check_mlflow(root, run_dirs) -> None:
    """The sweep's SQLite store: one experiment, a parent run, one finished child per run with its
    axes, full loss history and k-NN metric; `dinolab report` tabulates them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dinolab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("dinolab.kind") == "run"]
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {
        parent.info.run_id
    }
    for child in children:
        run_dir = next(d for d in run_dirs if d.name.endswith(child.data.tags["dinolab.run_id"]))
        logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        loss_steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert child.info.status == "FINISHED" and loss_steps == logged
        assert 0 <= child.data.metrics["knn_top1_k20"] <= 100
        assert child.data.tags["axis.teacher.momentum"] in ("0.996", "0.9")
    report = dinolab("report", "sweeps/quickstart.yaml", f"root={root}", *SHRINK)
    assert report.returncode == 0, report.stderr[-2000:]
    # One run per row, counted once: finished, or (momentum 0.9 may) collapsed, never both.
    states = report.stdout.count("| 1 finished ") + report.stdout.count("| 1 collapsed (")
    assert states == 4 and "k-NN top-1 (k=20)" in report.stdout, report.stdout


@pytest.mark.heavy
def test_a_killed_run_is_resumed_by_the_next_submit(tmp_path):
    """A run whose job died hard (record says running, no process) shows as lost and is resumed."""
    root = tmp_path / "sweeps"
    # Checkpoint cadence is not part of the run id: the same run, with checkpoints at 2, 4 and 6.
    args = [
        "sweeps/quickstart.yaml",
        f"root={root}",
        *SHRINK,
        "train.checkpoint_every_steps=2",
        "--run",
        "m0.9-nl0-bs32",
    ]
    first = dinolab("sweep", "run", *args, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:]
    (run_dir,) = [p for p in (root / "quickstart").iterdir() if p.name.startswith("m0.9-nl0")]
    # Simulate the hard death of a job at step 4: newest checkpoint removed, record left "running".
    final = max((run_dir / "checkpoints").iterdir())
    __import__("shutil").rmtree(final)
    records.update_record(str(run_dir), state="running", step=4)
    records.add_job(str(run_dir), "pretrain", "999999", "local", "/nonexistent.out", "/nonexistent.err")
    status = dinolab("sweep", "status", *args)
    assert "lost" in status.stdout
    again = dinolab("sweep", "run", *args, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:]
    assert "submitted 1 pretraining job(s)" in again.stdout
    record = records.read_record(str(run_dir))
    assert record["state"] == "completed" and record["evals"] == {"knn": "completed"}
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "(step 4," in log


@pytest.mark.heavy
def test_a_sweep_with_its_runs_on_s3(s3_env, tmp_path, monkeypatch):
    """root=s3://...: run folders, records, checkpoints, evaluations and MLflow artifacts go to the
    object store; submitit's files and the SQLite store stay on the shared filesystem (logs_root);
    the local copies made to upload artifacts are gone afterwards."""
    import mlflow

    # Where the jobs' temporary files go. Short: a data loader worker passes tensors through a Unix
    # socket made under TMPDIR, whose path may not exceed 107 bytes; under pytest-xdist a tmp_path
    # (/tmp/pytest-of-root/pytest-122/popen-gw1/test_a_sweep_…/tmp/pymp-…/listener-…) did, and the
    # loader waited for ever ("AF_UNIX path too long" in the job's log).
    jobs_tmp = Path(tempfile.mkdtemp(prefix="dl-"))
    monkeypatch.setenv("TMPDIR", str(jobs_tmp))

    root, logs_root = "s3://dinolab-test/sweeps", tmp_path / "logs"
    args = [
        "sweeps/quickstart.yaml",
        f"root={root}",
        f"logs_root={logs_root}",
        *SHRINK,
        "--run",
        "m0.9-nl0-bs32",
    ]
    proc = dinolab("sweep", "run", *args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = s3_env.keys(root)
    (run,) = {k.split("/")[2] for k in keys if k.startswith("sweeps/quickstart/m0.9-nl0-bs32-")}
    run_dir = f"{root}/quickstart/{run}"
    record = records.read_record(run_dir)
    assert record["state"] == "completed" and record["evals"] == {"knn": "completed"}
    assert any(
        k.startswith(f"sweeps/quickstart/{run}/checkpoints/") and k.endswith("COMPLETE.json") for k in keys
    )
    assert any(k.startswith(f"sweeps/quickstart/{run}/eval/knn/") for k in keys)
    assert any(k.startswith("sweeps/mlartifacts/quickstart/") and k.endswith("config.yaml") for k in keys)
    assert list((logs_root / "quickstart" / ".submitit").iterdir())  # scheduler files stay local
    assert not list(jobs_tmp.glob("dinolab-artifact-*"))  # uploaded copies removed
    shutil.rmtree(jobs_tmp, ignore_errors=True)
    status = dinolab("sweep", "status", *args)
    assert status.returncode == 0 and "1 completed" in status.stdout
    mlflow.set_tracking_uri(f"sqlite:///{logs_root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quickstart"], filter_string="tags.`dinolab.kind` = 'run'")
    assert (
        len(runs) == 1
        and runs.iloc[0]["status"] == "FINISHED"
        and runs.iloc[0]["artifact_uri"].startswith("s3://")
    )


@pytest.mark.parametrize(
    ("inherited", "setup", "expected"),
    [(None, [], "1"), ("2", [], "2"), (None, ["export OMP_NUM_THREADS=3"], "3")],
    ids=["cpus_per_task", "environment-wins", "stage-setup-wins"],
)
def test_a_local_job_gets_as_many_threads_as_cpus_it_asked_for(
    tmp_path, monkeypatch, inherited, setup, expected
):
    """Without this, every local job (and SLURM jobs not bound to their CPUs) used a thread per core
    of the machine: two quickstart runs on 2 cores trained 27x slower than with a thread each. Real
    submitit local jobs; torch reads OMP_NUM_THREADS when it starts in the job's process."""
    import os

    import torch

    from launcher.executors import build_executor
    from launcher.sweep_file import load_sweep

    if inherited is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", inherited)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"name": "s", "root": str(tmp_path), "grid": {"train.seed": [0]},
                                "resources": {"pretrain": {"cpus_per_task": 1, "setup": setup}}}))  # fmt: skip
    executor = build_executor(load_sweep(path), "pretrain", "local", str(tmp_path / "submitit"))
    assert executor.submit(os.getenv, "OMP_NUM_THREADS").result() == expected
    if inherited is None and not setup:  # torch's default here would be 2, one per core
        assert executor.submit(torch.get_num_threads).result() == 1
