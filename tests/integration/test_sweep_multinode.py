"""A sweep stage of 2 nodes on the real two-node partition of the local SLURM cluster.

`tools/slurm/slurm-local.sh` runs slurmd `n1` (127.0.0.2) and `n2` (127.0.0.3) beside `localhost`,
partitions `multi` (n1, n2) and `multi-urgent` (preempts `multi`). One run with `nodes: 2,
tasks_per_node: 1` trains with gloo across the two nodes (rendezvous from SLURM through submitit's
TorchDistributedEnvironment, MASTER_ADDR=n1), is preempted mid-run by a 2-node urgent job, requeued
as a whole allocation, resumes, and ends bitwise equal to an uninterrupted 1-node 2-process run of
the same config; its k-NN stage runs as 2 tasks on the 2 nodes and gives the 1-process result.
All traffic stays on loopback addresses (GLOO_SOCKET_IFNAME=lo).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from launcher import records
from tests.integration.cli import assert_equals_torchrun_reference, dinolab, results
from tests.integration.slurm_cluster import slurm_cluster  # noqa: F401
from tests.integration.test_sweep_slurm import TINY_BASE, epochs_lasting, logged_steps, run_dirs, wait_for

# On nodes n1, n2 only: beside the tests on node `localhost` (xdist group "slurm", tests/conftest.py).
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm-multi")]

# Same float results in the jobs and in the reference; gloo on the loopback interface only.
SETUP = ["export OMP_NUM_THREADS=1", "export GLOO_SOCKET_IFNAME=lo"]
TWO_NODES = {"partition": "multi", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 1,
             "setup": SETUP}  # fmt: skip


def test_two_node_run_is_preempted_resumes_exactly_and_evaluates_on_two_nodes(slurm_cluster, tmp_path):  # noqa: F811
    # Global batch 8 = 2 ranks x 4: the steps of TINY_BASE's 1-process runs, about 30 s of training.
    base = [*TINY_BASE, "optim.batch_size=4", f"optim.epochs={epochs_lasting(30)}"]
    sweep = tmp_path / "two.yaml"
    sweep.write_text(
        json.dumps(
            {
                "name": "two",
                "root": str(tmp_path / "sweeps"),
                "base": base,
                "grid": {"teacher.momentum": [0.996]},
                "evals": ["knn"],
                "eval_overrides": {"knn": ["knn.max_test=64", "shard_size=16", "workers=0", "device=cpu"]},
                "resources": {
                    "pretrain": {**TWO_NODES, "timeout_min": 60, "signal_delay_s": 30},
                    "knn": {**TWO_NODES, "timeout_min": 30},
                },
            }
        )
    )
    sub = dinolab("sweep", "submit", str(sweep), "--executor", "slurm")
    assert sub.returncode == 0, sub.stderr
    (run_dir,) = wait_for(lambda: list(run_dirs(tmp_path, "two").values()), 60, "the run folder")

    def record():
        return records.read_record(str(run_dir))

    # Preempt it once it trained past its first checkpoint (step 20): a 2-node job of the urgent
    # partition takes both nodes; SLURM sends USR2, rank 0 stops every rank at the next step, writes
    # the checkpoint and requeues the whole allocation.
    wait_for(lambda: record().get("state") == "running" and record().get("step", 0) >= 25, 240, "step 25")
    job = record()["job_id"]
    assert (
        "n[1-2]"
        in subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True).stdout
    )
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "multi-urgent", "-N", "2", "-n", "2", "--mem=100M",
         "-o", str(tmp_path / "urgent.out"), "--wrap", "srun sleep 10"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    wait_for(lambda: record().get("requeues", 0) >= 1, 120, "the preempted run's requeue")
    stopped_at = record()["requeued_at_step"]
    wait_for(
        lambda: (
            record().get("state") in ("completed", "failed")
            and record().get("evals", {}).get("knn") in ("completed", "failed")
        ),
        600,
        "the resumed run and its k-NN",
        poll=2,
    )
    assert record()["state"] == "completed", record().get("error")
    assert record()["evals"]["knn"] == "completed"
    slurm_cluster.wait_state(urgent, {"COMPLETED"}, 60)
    assert "REQUEUED" in " ".join(slurm_cluster.sacct_history(job)) or "PREEMPTED" in " ".join(
        slurm_cluster.sacct_history(job)
    )
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NodeList"], capture_output=True,
                           text=True).stdout  # fmt: skip
    assert "n[1-2]" in nodes, nodes

    log = (run_dir / "train.log").read_text()
    assert "2 process(es)" in log and f"resumed from {run_dir}/checkpoints/" in log
    total = record()["total_steps"]
    assert 20 <= stopped_at < total
    # Rank 0 alone logged: every step once, none lost by the preemption (it stopped at a checkpoint).
    assert logged_steps(run_dir) == list(range(1, total + 1))

    # One MLflow run for the run, with each step's loss once (rank 0 only), FINISHED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("two").experiment_id], "tags.`dinolab.kind` = 'run'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(history) == list(range(1, total + 1))

    # The reference: the same config, uninterrupted, as one node with 2 processes (torchrun).
    ref_dir = tmp_path / "ref"
    assert_equals_torchrun_reference(run_dir, ref_dir, [*base, "teacher.momentum=0.996"], total)

    # k-NN: 2 tasks on 2 nodes (each its share of the feature shards) = 1 process.
    (two_tasks,) = results(run_dir, "knn").values()
    single = dinolab("eval", "knn", f"run.dir={ref_dir}", "knn.max_test=64", "shard_size=16", "workers=0",
                     "device=cpu")  # fmt: skip
    assert single.returncode == 0, single.stderr
    (one_task,) = results(ref_dir, "knn").values()
    assert two_tasks["top1"] == one_task["top1"] and two_tasks["top5"] == one_task["top5"]
    knn_job = records.last_job(str(run_dir), "knn")["job_id"]
    knn_nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", knn_job, "-o", "NodeList"],
                               capture_output=True, text=True).stdout  # fmt: skip
    assert "n[1-2]" in knn_nodes, knn_nodes
