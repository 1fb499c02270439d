"""`dinolab sweep` against the real single-node SLURM cluster (tools/slurm/slurm-local.sh).

One 2x2 grid submitted as an array with parallelism 2: one running job is preempted by a job in the
`urgent` partition, another gets USR2 from `scancel --signal=USR2`; both resume at the step they
stopped at and end with the weights of an uninterrupted run. A job killed with SIGKILL is resumed by
a second `submit`; the chained k-NN evaluations start only after their pretraining ended.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from launcher import records
from launcher.scheduler import slurm_states
from tests.conftest import load_final
from tests.integration.cli import dinolab
from tests.integration.slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY_BASE = [
    "model=vit_test", "data=synthetic", "data.num_samples=64", "data.image_size=32", "optim.batch_size=8",
    "optim.epochs=30", "model.drop_path=0.1", "train.workers=0", "train.log_every=1", "train.device=cpu",
    "train.checkpoint_every_steps=20", "train.checkpoint_every_minutes=0",
]  # fmt: skip
SETUP = ["export OMP_NUM_THREADS=1"]  # same float results in the job and in the reference run


def epochs_lasting(seconds: float) -> int:
    """Epochs of TINY_BASE that keep a SLURM job training for about `seconds` on this machine (>= 30).

    The grid test acts on runs while they train (kills one, preempts one, sends USR2 to another)
    through CLI calls, SLURM's scheduling and its KillWait, whose latencies do not shrink on a faster
    CPU: 30 epochs (240 steps) last ~30 s on the slower 2-core CI machine but ~8 s on one 3.6x faster
    (AMD EPYC, 2026-11-27), where runs finished before the test reached them. A job's step costs ~4x
    `dinolab bench`'s (measured 35 ms vs 8.3: a log line, a record and a metrics line every step).
    """
    proc = dinolab("bench", *TINY_BASE, "--input", "synthetic", "--warmup", "3", "--steps", "20", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    step_ms = 4 * json.loads(proc.stdout)["synthetic_step_ms"]
    return max(30, math.ceil(seconds * 1000 / step_ms / (64 // 8)))


def write_sweep(tmp_path: Path, name: str, **extra) -> Path:
    content = {
        "name": name,
        "root": str(tmp_path / "sweeps"),
        "base": TINY_BASE,
        "grid": {"teacher.momentum": [0.996, 0.99], "optim.lr": [0.0005, 0.001]},
        "short_names": {"teacher.momentum": "m", "optim.lr": "lr"},
        "array_parallelism": 2,
        "evals": ["knn"],
        "eval_overrides": {"knn": ["knn.max_test=64"]},
        "resources": {
            "pretrain": {"partition": "debug", "cpus_per_task": 2, "mem_gb": 2, "timeout_min": 60, "signal_delay_s": 30, "setup": SETUP},
            "knn": {"partition": "debug", "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 30, "setup": SETUP},
        },
    }  # fmt: skip
    content.update(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def run_dirs(tmp_path: Path, name: str) -> dict[str, Path]:
    folder = tmp_path / "sweeps" / name
    return {
        p.name.rsplit("-", 1)[0]: p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != "code"
    }


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grid_survives_preemption_usr2_and_sigkill(slurm_cluster, tmp_path):  # noqa: F811
    base = [*TINY_BASE, f"optim.epochs={epochs_lasting(30)}"]
    sweep = write_sweep(tmp_path, "grid", base=base)
    sub = dinolab("sweep", "submit", str(sweep), "--executor", "slurm")
    assert sub.returncode == 0, sub.stderr
    assert (
        "submitted 4 pretraining job(s)" in sub.stdout and "submitted 4 evaluation job(s) (knn)" in sub.stdout
    )
    dirs = wait_for(lambda: (d := run_dirs(tmp_path, "grid")) and len(d) == 4 and d, 60, "4 run folders")

    def step_of(name):
        return records.read_record(str(dirs[name])).get("step", 0)

    def running():
        return [
            n for n in dirs if records.read_record(str(dirs[n])).get("state") == "running" and step_of(n) >= 5
        ]

    # Parallelism 2: two runs train, two wait in the queue (SLURM shows them pending).
    two = wait_for(lambda: len(r := running()) == 2 and r, 120, "two runs training")
    status = dinolab("sweep", "status", str(sweep))
    assert status.stdout.count("running") >= 2 and "pending" in status.stdout, status.stdout

    # 1) SIGKILL one job past its first checkpoint: no checkpoint, no requeue; the run is lost until
    #    the next submit.
    victim = wait_for(
        lambda: next((n for n in two if step_of(n) >= 25), None), 120, "a run past its first checkpoint"
    )
    victim_job = records.read_record(str(dirs[victim]))["job_id"]
    subprocess.run(["scancel", "--signal=KILL", "--full", victim_job], check=True)
    slurm_cluster.wait_state(victim_job, {"FAILED", "CANCELLED", "COMPLETED"}, 60)

    # 2) An urgent job that needs half the node preempts (requeues) one of the running debug jobs.
    wait_for(lambda: len(running()) == 2, 120, "two runs training again")
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-c", "2", "--mem=100M", "-o", str(tmp_path / "urgent.out"),
         "--wrap", "sleep 15"], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    preempt_run = wait_for(
        lambda: next(
            (n for n in dirs if n != victim and records.read_record(str(dirs[n])).get("requeues")), None
        ),
        90,
        "a preempted run",
    )
    status = dinolab("sweep", "status", str(sweep))
    assert "requeued" in status.stdout and "lost" in status.stdout, status.stdout

    # 3) USR2 to another running job, as SLURM sends before a time limit.
    usr2_run = wait_for(
        lambda: next((n for n in running() if n not in (preempt_run, victim)), None), 120, "another run"
    )
    job_usr2 = records.read_record(str(dirs[usr2_run]))["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_usr2], check=True)
    wait_for(lambda: records.read_record(str(dirs[usr2_run])).get("requeues", 0) >= 1, 90, "USR2 requeue")

    # Everything else finishes (evaluations included); the killed run shows as lost.
    def settled():
        states = {n: records.read_record(str(dirs[n])).get("state") for n in dirs}
        others = [n for n in dirs if n != victim]
        done = all(states[n] == "completed" and records.read_record(str(dirs[n])).get("evals", {}).get("knn") == "completed"
                   for n in others)  # fmt: skip
        return done and states

    wait_for(settled, 600, "the other three runs and their k-NN", poll=2)
    slurm_cluster.wait_state(urgent, {"COMPLETED"}, 60)
    status = dinolab("sweep", "status", str(sweep))
    assert "lost" in status.stdout and "3 completed" in status.stdout, status.stdout

    # A second submit resumes only the killed run (and chains its evaluation).
    again = dinolab("sweep", "submit", str(sweep), "--executor", "slurm")
    assert again.returncode == 0, again.stderr
    assert "submitted 1 pretraining job(s)" in again.stdout and again.stdout.count("skip (finished)") == 3
    wait_for(
        lambda: records.read_record(str(dirs[victim])).get("evals", {}).get("knn") == "completed",
        400,
        "resumed run",
        2,
    )
    assert "resumed from" in (dirs[victim] / "train.log").read_text()

    for name, run_dir in dirs.items():
        record = records.read_record(str(run_dir))
        total = record["total_steps"]
        steps = logged_steps(run_dir)
        if name == victim:  # killed between checkpoints: the steps after the last checkpoint ran twice
            assert sorted(set(steps)) == list(range(1, total + 1))
            continue
        assert steps == list(range(1, total + 1)), f"{name}: a step trained twice or skipped"
        # Chained evaluation: its job started after the pretraining ended.
        knn_job = records.last_job(str(run_dir), "knn")["job_id"]
        start = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", knn_job, "-o", "Start"], capture_output=True, text=True
        ).stdout
        assert (
            time.mktime(time.strptime(start.split()[0], "%Y-%m-%dT%H:%M:%S")) >= int(record["finished"]) - 1
        )
    assert records.read_record(str(dirs[usr2_run]))["requeues"] >= 1
    assert records.read_record(str(dirs[preempt_run]))["requeues"] >= 1
    assert "REQUEUED" in " ".join(
        slurm_cluster.sacct_history(records.last_job(str(dirs[preempt_run]))["job_id"])
    )

    # The interrupted runs end with the weights of an uninterrupted run of the same config.
    for name in (usr2_run, preempt_run):
        overrides = yaml.safe_load((dirs[name] / "config.yaml").read_text())
        ref_dir = tmp_path / f"ref-{name}"
        args = [*base, f"teacher.momentum={overrides['teacher']['momentum']}", f"optim.lr={overrides['optim']['lr']}",
                f"run.dir={ref_dir}"]  # fmt: skip
        ref = dinolab("train", *args)
        assert ref.returncode == 0, ref.stderr[-2000:]
        a, b = load_final(ref_dir), load_final(dirs[name])
        for part in ("student", "teacher"):
            assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), f"{name} {part}"


def test_two_task_job_runs_ddp_with_gloo(slurm_cluster, tmp_path):  # noqa: F811
    sweep = write_sweep(
        tmp_path, "ddp", grid={"teacher.momentum": [0.996]}, evals=[], base=[*TINY_BASE, "optim.epochs=2", "optim.batch_size=4"],
        resources={"pretrain": {"partition": "debug", "tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 30}},
    )  # fmt: skip
    sub = dinolab("sweep", "submit", str(sweep), "--executor", "slurm")
    assert sub.returncode == 0, sub.stderr
    (run_dir,) = wait_for(lambda: list(run_dirs(tmp_path, "ddp").values()), 60, "run folder")
    wait_for(
        lambda: records.read_record(str(run_dir)).get("state") in ("completed", "failed"), 300, "DDP run", 2
    )
    record = records.read_record(str(run_dir))
    assert record["state"] == "completed", record.get("error")
    assert "2 process(es)" in (run_dir / "train.log").read_text()
    assert record["step"] == 2 * 64 // (4 * 2)  # global batch 8 over 2 ranks


def test_status_shows_a_failed_run_with_its_error(slurm_cluster, tmp_path):  # noqa: F811
    sweep = write_sweep(
        tmp_path, "bad", grid={"teacher.momentum": [0.996]}, evals=[],
        base=[*TINY_BASE, "data=imagefolder", "data.root=/nonexistent/imagenet"],
    )  # fmt: skip
    sub = dinolab("sweep", "submit", str(sweep), "--executor", "slurm")
    assert sub.returncode == 0, sub.stderr
    (run_dir,) = wait_for(lambda: list(run_dirs(tmp_path, "bad").values()), 60, "run folder")
    wait_for(lambda: records.read_record(str(run_dir)).get("state") == "failed", 180, "the failure")
    status = dinolab("sweep", "status", str(sweep))
    assert "failed" in status.stdout and "data.root=/nonexistent/imagenet" in status.stdout, status.stdout
    # The job writes "failed" as its last act and stays in the queue until its process has ended;
    # until then `submit` rightly calls the run active (a second job would meet the first's lock).
    job = records.last_job(str(run_dir))["job_id"]
    wait_for(lambda: not slurm_states([job]), 60, "the failed job to leave the queue")
    again = dinolab("sweep", "submit", str(sweep), "--executor", "slurm", "--only", "failed")
    assert "submitted 1 pretraining job(s)" in again.stdout
