"""`dinolab train` as a user runs it: real processes, real kills, torchrun with gloo, Fashion-MNIST."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dino.io import checkpoint
from tests.conftest import load_final
from tests.integration.cli import REPO, TINY, dinolab, env


def test_train_command_creates_a_complete_run(tmp_path):
    proc = dinolab("train", *TINY, f"run.dir={tmp_path / 'r1'}")
    assert proc.returncode == 0, proc.stderr
    assert "finished: step 16/16" in proc.stdout
    assert "step 16/16 epoch 2.00 loss" in proc.stderr  # the console log (no terminal: log lines)
    run_dir = tmp_path / "r1"
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    assert checkpoint.complete_steps(str(run_dir)) == [16]


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.epohcs=2"], "unknown config key 'optim.epohcs'; did you mean optim.epochs?"),
        (["train.precision=fp8"], "train.precision='fp8' is not allowed"),
        (["data.num_samples=4"], "the dataset has 4 images, fewer than one global batch (optim.batch_size=8"),
        (
            ["data=fashion_mnist", "data.root=/nonexistent/fmnist"],
            "looked for /nonexistent/fmnist/train-images-idx3-ubyte.gz",
        ),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, args, message):
    proc = dinolab("train", *TINY, f"run.dir={tmp_path / 'r'}", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    # With the k-NN monitor every 8 steps on 64 bank / 63 query images: under DDP each rank encodes
    # every 2nd image (32 and 31/32 of them) and the gathered features must give the same figures.
    monitor = ["monitor.knn_every_steps=8", "monitor.knn_train=64", "monitor.knn_test=63", "monitor.knn_k=5"]
    common = [*TINY, "model.drop_path=0", "train.precision=fp32", "train.workers=0", *monitor]
    single = dinolab("train", *common, "optim.batch_size=8", f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "launcher.cli", "train", *common, "optim.batch_size=4", f"run.dir={tmp_path / 'ddp'}"],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stderr
    a, b = load_final(tmp_path / "single"), load_final(tmp_path / "ddp")
    assert a["step"] == b["step"] == 16
    for part in ("student", "teacher"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], rtol=1e-4, atol=1e-5), f"{part}.{key}"
    assert torch.allclose(a["loss"]["center"], b["loss"]["center"], rtol=1e-4, atol=1e-6)
    curves = []
    for name in ("single", "ddp"):
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves.append({m["step"]: m["monitor_knn_top1"] for m in lines if "monitor_knn_top1" in m})
        assert "(k=5, 64 bank / 63 queries" in (tmp_path / name / "train.log").read_text()
    assert sorted(curves[0]) == sorted(curves[1]) == [8, 16]
    for step in (8, 16):  # weights agree to 1e-4: at most one near-tie query may flip
        assert abs(curves[0][step] - curves[1][step]) <= 100 / 63 + 1e-9, curves


@pytest.mark.slow
@pytest.mark.heavy
def test_ranks_that_do_not_share_the_run_folder_are_refused_on_resume(tmp_path):
    """A node-local run.dir (simulated: one folder per rank) would let rank 0 resume while the other
    ranks start over; every rank compares the checkpoint it found and all refuse, naming run.dir."""
    args = [
        *TINY,
        "train.workers=0",
        "optim.batch_size=4",
        "run.dir=" + str(tmp_path) + "/rank${oc.env:RANK}",
    ]

    def torchrun(*extra):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "launcher.cli", "train", *args, *extra],
            capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
        )  # fmt: skip

    first = torchrun("train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.complete_steps(str(tmp_path / "rank0")) == [4]  # rank 0 alone writes
    assert checkpoint.complete_steps(str(tmp_path / "rank1")) == []
    again = torchrun()
    assert again.returncode != 0
    # Every rank raises the one-line error, but torchrun stops the other rank as soon as the first
    # exits, so whether the second's line reaches stderr is a race (CI once saw one line): at least
    # one, and every printed one is the same refusal (torchrun then prints its own ChildFailedError).
    errors = [line for line in again.stderr.splitlines() if line.startswith("dinolab train: error:")]
    assert 1 <= len(errors) <= 2, again.stderr[-3000:]
    assert all("the ranks see different checkpoints in run.dir=" in e for e in errors)
    assert all("(newest step by rank: [4, 0])" in e and "shared by every node" in e for e in errors)
    assert checkpoint.complete_steps(str(tmp_path / "rank0")) == [4]  # nothing trained, nothing lost
    assert checkpoint.complete_steps(str(tmp_path / "rank1")) == []


@pytest.mark.slow
@pytest.mark.heavy
def test_a_frozen_rank_under_plain_torchrun_stops_the_job_with_exit_code_75(tmp_path):
    """The watchdog without the launcher: rank 1 frozen (SIGSTOP), rank 0 waits in its all-reduce;
    after train.hang_timeout_s the job ends with the hung exit code, the one line naming rank 1, rank
    0's stacks and py-spy's dump of the frozen rank in health/. (Requeue on SLURM: test_hang.py.)"""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [*TINY, "optim.epochs=200", "train.workers=0", "optim.batch_size=4", f"run.dir={run_dir}",
            "train.hang_timeout_s=5"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "launcher.cli", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
    )  # fmt: skip
    beat, hang = run_dir / "health" / "train-rank1.json", run_dir / "health" / "hang.json"
    deadline = time.time() + 120
    while not (beat.exists() and json.loads(beat.read_text())["step"] >= 5):
        assert time.time() < deadline and proc.poll() is None, "rank 1 never reached step 5"
        time.sleep(0.2)
    pid = json.loads(beat.read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    frozen_at = time.time()
    while not hang.exists():
        assert time.time() - frozen_at < 60, "the watchdog did not fire"
        time.sleep(0.2)
    detected = time.time() - frozen_at
    os.kill(pid, signal.SIGCONT)  # torchrun's SIGTERM then ends it at once (else after 30 s)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "exitcode  : 75" in err, err[-3000:]  # torchrun names rank 0's exit code
    assert 5 <= detected < 20
    print(f"hang.json {detected:.1f} s after the SIGSTOP")
    found = json.loads(hang.read_text())
    assert (found["rank"], found["frozen"], found["pid"], found["detected_by"]) == (1, True, pid, 0)
    assert "hung: rank 1 on" in (run_dir / "train.log").read_text()
    stacks = (run_dir / "health" / f"stacks-train-rank0-{found['detected_on']}.txt").read_text()
    # Waiting for rank 1: in a collective of ours (the centre's, the window's all_reduce) or in DDP's
    # gradient all-reduce, which runs in C++ under `backward` (where rank 0 is depends on the step).
    assert "dino/run/loop.py" in stacks and ("all_reduce" in stacks or " in backward" in stacks), stacks
    frozen = (run_dir / "health" / "py-spy-train-rank1.txt").read_text()  # read from outside
    assert f"Process {pid}" in frozen and "dino/run/loop.py" in frozen
