"""Tracking against the real stores: embedded SQLite and a real `mlflow server`.

A killed and restarted run must end as one MLflow run with one gap-free, duplicate-free history;
many processes must share one store; a server outage in the middle of training loses nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.cli import DINOLAB, REPO, TINY, dinolab, env
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.heavy), "server"])  # quick: the server
def store_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    return request.getfixturevalue("mlflow_server").uri


def steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def the_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def wait_for_lines(path, n: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "training ended too early"
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


def test_killed_and_resumed_run_is_one_mlflow_run_with_a_gapless_history(store_uri, tmp_path):
    """SIGKILL a tracked `dinolab train` between checkpoints, start it again: one MLflow run whose
    loss history is steps 1..N exactly once, with params, provenance tags and artifacts."""
    experiment = f"resume-{tmp_path.name}"
    run_dir = tmp_path / "run"
    args = [*TINY, "optim.epochs=8", "train.log_every=1", "train.checkpoint_every_steps=8",
            f"run.dir={run_dir}", f"tracking.uri={store_uri}", f"tracking.experiment={experiment}"]  # fmt: skip
    proc = subprocess.Popen([*DINOLAB, "train", *args], env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    client = MlflowClient(store_uri)
    deadline = time.time() + 300
    while time.time() < deadline:  # the first process has its MLflow run and has counted its start
        assert proc.poll() is None, "training ended before its MLflow run existed"
        link = run_dir / "tracking.json"
        if (
            link.exists()
            and "dinolab.starts" in client.get_run(json.loads(link.read_text())["run_id"]).data.tags
        ):
            break
        time.sleep(0.1)
    metrics = run_dir / "metrics.jsonl"
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    wait_for_lines(metrics, max(10, done + 3), proc)  # past the step-8 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 64, "the process should have died mid-run"

    again = dinolab("train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr

    run = the_run(client, experiment)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id) == list(range(1, 65))
    assert steps(client, run.info.run_id, "teacher_entropy") == list(range(1, 65))
    assert run.data.params["optim.batch_size"] == "8" and run.data.params["model.name"] == "vit_test"
    assert run.data.tags["dinolab.starts"] == "2" and run.data.tags["dinolab.requeues"] == "1"
    assert len(run.data.tags["dinolab.config_hash"]) == 8 and run.data.tags["dinolab.host"]
    assert run.data.metrics["gpu_hours"] > 0 and run.data.metrics["avg_img_per_s"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "metrics.jsonl"}


WRITER = textwrap.dedent(
    """
    import sys
    from dino.io.mlflow_tracker import MLflowTracker
    uri, run_dir, experiment = sys.argv[1:4]
    t = MLflowTracker(uri, run_dir, experiment=experiment, flush_timeout_s=120)
    t.log_params({"index": run_dir[-1], "lr": 0.1})
    for step in range(1, 41):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    t.close("FINISHED")
    """
)


def test_eight_processes_share_one_fresh_store(store_uri, tmp_path):
    """8 writers start at once against a store that has no experiment yet (for SQLite: no file)."""
    experiment = f"parallel-{tmp_path.name}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, store_uri, str(tmp_path / f"run{i}"), experiment],
            env=env(),
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(8)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not any("unreachable" in e or "Traceback" in e for e in errors), errors
    client = MlflowClient(store_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.params["index"] for r in runs) == [str(i) for i in range(8)]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert steps(client, r.info.run_id) == list(range(1, 41))
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])


@pytest.mark.heavy
def test_server_outage_during_training_loses_no_metric(tmp_path):
    """Stop the server while a run trains, start it again later: training never stops, and every
    logged step reaches the server once it is back."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        run_dir = tmp_path / "run"
        args = [*TINY, "optim.epochs=12", "train.log_every=1", f"run.dir={run_dir}",
                f"tracking.uri={server.uri}", "tracking.experiment=outage", "tracking.flush_timeout_s=300"]  # fmt: skip
        proc = subprocess.Popen([*DINOLAB, "train", *args], env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_for_lines(run_dir / "metrics.jsonl", 5, proc)
        server.stop()
        down_at = len((run_dir / "metrics.jsonl").read_text().splitlines())
        wait_for_lines(run_dir / "metrics.jsonl", down_at + 20, proc)  # training goes on
        server.start()
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert "unreachable" in stderr and "reachable again" in stderr
        client = MlflowClient(server.uri)
        run = the_run(client, "outage")
        assert run.info.status == "FINISHED"
        assert steps(client, run.info.run_id) == list(range(1, 97))
    finally:
        server.stop()
