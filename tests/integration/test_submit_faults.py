"""`sweep submit` when SLURM refuses (issue 20, item 10), on the real local cluster: one line with
sbatch's own message and the stage, nothing queued, no record or MLflow run left saying `pending`;
the next submit after the fix submits normally. A controller that does not answer `squeue` is named
in one line by `status` instead of being read as "no live job"."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.cli import DINOLAB, dinolab, env
from tests.integration.slurm_cluster import slurm_cluster  # noqa: F401
from tests.integration.test_sweep_slurm import run_dirs, write_sweep

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _queued(name: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True
    ).stdout.strip()


def _mlflow_runs(tmp_path: Path, sweep: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(sweep)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_refused_array_leaves_nothing_and_the_fixed_sweep_submits(slurm_cluster, tmp_path):  # noqa: F811
    good = write_sweep(tmp_path, "refused", grid={"teacher.momentum": [0.996]})
    content = yaml.safe_load(good.read_text())

    # 1) The pretraining array is refused: nothing is queued, nothing recorded.
    content["resources"]["pretrain"]["partition"] = "nosuch"
    good.write_text(yaml.safe_dump(content))
    proc = dinolab("sweep", "submit", str(good), "--executor", "slurm")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"dinolab sweep: error: {good}: slurm refused the pretrain array (partition nosuch): "
                    "sbatch: error: Batch job submission failed: Invalid partition name specified; "
                    "nothing was submitted")  # fmt: skip
    for run_dir in run_dirs(tmp_path, "refused").values():
        assert not (run_dir / "record.json").exists() and not (run_dir / "jobs.json").exists()
        assert not (run_dir / "tracking.json").exists()
    assert _mlflow_runs(tmp_path, "refused") == []  # no run SCHEDULED for a job that never existed
    assert _queued("refused-pretrain") == ""

    # 2) Pretraining is accepted but the k-NN array is refused: the pretraining job is cancelled.
    content["resources"]["pretrain"]["partition"] = "debug"
    content["resources"]["knn"]["partition"] = "nosuch"
    good.write_text(yaml.safe_dump(content))
    proc = dinolab("sweep", "submit", str(good), "--executor", "slurm")
    assert proc.returncode == 2, proc.stderr
    assert (
        "slurm refused the knn array (partition nosuch)" in proc.stderr
        and "nothing was submitted" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert "RUNNING" not in _queued("refused-pretrain") and "PENDING" not in _queued("refused-pretrain")
    for run_dir in run_dirs(tmp_path, "refused").values():
        assert not (run_dir / "record.json").exists() and not (run_dir / "jobs.json").exists()
    assert _mlflow_runs(tmp_path, "refused") == []

    # 3) Fixed: the run is new (not "resume" of a submission that never happened) and submits.
    content["resources"]["knn"]["partition"] = "debug"
    good.write_text(yaml.safe_dump(content))
    proc = dinolab("sweep", "submit", str(good), "--executor", "slurm")
    assert proc.returncode == 0, proc.stderr
    assert "│ new " in proc.stdout and "submitted 1 pretraining job(s)" in proc.stdout
    (run_dir,) = run_dirs(tmp_path, "refused").values()
    assert json.loads((run_dir / "jobs.json").read_text())[0]["stage"] == "pretrain"
    try:
        # 4) squeue cannot reach the controller: status says so instead of calling the job lost.
        bad_conf = tmp_path / "slurm.conf"
        bad_conf.write_text(
            Path("/etc/slurm/slurm.conf")
            .read_text()
            .replace("SlurmctldHost=localhost", "SlurmctldHost=localhost\nSlurmctldPort=9", 1)
        )
        status = subprocess.run(
            [*DINOLAB, "sweep", "status", str(good)], capture_output=True, text=True, timeout=300,
            env={**env(), "SLURM_CONF": str(bad_conf)},
        )  # fmt: skip
        assert status.returncode == 2, status.stdout + status.stderr
        assert "squeue failed (exit 1) asking for job" in status.stderr
        assert "Unable to contact slurm controller (connect failure)" in status.stderr
    finally:
        subprocess.run(["scancel", "-n", "refused-pretrain"], check=False)
        subprocess.run(["scancel", "-n", "refused-knn"], check=False)
