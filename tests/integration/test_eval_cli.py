"""`dinolab eval` and `dinolab viz` as a user runs them: real processes, torchrun, Fashion-MNIST."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.integration.cli import REPO, TINY, dinolab, env, results


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_cli") / "run"
    proc = dinolab("train", *TINY, "train.workers=0", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.slow
def test_eval_knn_prints_a_table_and_writes_json_for_checkpoint_and_baselines(tiny_run):
    proc = dinolab("eval", "knn", f"run.dir={tiny_run}", "workers=0")
    assert proc.returncode == 0, proc.stderr
    assert "k-NN (000000016)" in proc.stdout and "top-1 %" in proc.stdout
    assert f"checkpoint {tiny_run}/checkpoints/000000016 (step 16, config" in proc.stdout
    for k in (10, 20, 100, 200):
        assert f"│ {k:>3} │" in proc.stdout
    for baseline in ("random", "pixels"):
        proc = dinolab("eval", "knn", f"run.dir={tiny_run}", "workers=0", f"baseline={baseline}")
        assert proc.returncode == 0, proc.stderr
        assert f"baseline {baseline}" in proc.stdout
    saved = results(tiny_run, "knn")
    assert sorted(r["target"] for r in saved.values()) == ["000000016", "pixels", "random-seed0"]
    checkpoint_result = next(r for r in saved.values() if r["target"] == "000000016")
    assert checkpoint_result["step"] == 16 and checkpoint_result["num_test"] == 64


@pytest.mark.slow
@pytest.mark.heavy
def test_eval_linear_and_viz_attention(tiny_run, tmp_path):
    proc = dinolab(
        "eval", "linear", f"run.dir={tiny_run}", "workers=0", "linear.epochs=2", "linear.n_last_blocks=2",
        "linear.batch_size=16", "linear.max_epochs=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "stopped at epoch 1 (run again to continue)" in proc.stdout
    proc = dinolab(
        "eval", "linear", f"run.dir={tiny_run}", "workers=0", "linear.epochs=2", "linear.n_last_blocks=2",
        "linear.batch_size=16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "final" in proc.stdout and "best over epochs" in proc.stdout and "2/2" in proc.stdout
    assert "resumed from" in proc.stderr
    (saved,) = results(tiny_run, "linear").values()
    assert saved["finished"] and saved["final"]["epoch"] == 2 and saved["step"] == 16

    image = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    out = tmp_path / "attn.png"
    proc = dinolab("viz", "attention", f"run.dir={tiny_run}", f"image={image}", f"out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "image + 2 heads" in proc.stdout
    with Image.open(out) as png:
        assert png.size == (750, 250)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["knn.kk=5"], "unknown config key 'knn.kk'; did you mean knn.k?"),
        (["checkpoint={run}/checkpoints/000000099"], "is partial"),
        (["data=fashion_mnist", "data.root=/nonexistent/fm"], "looked for /nonexistent/fm/"),
        (["run.dir=/nonexistent/run", "baseline=random"], "/nonexistent/run is not a run folder"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_run, tmp_path, args, message):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    (run_dir / "checkpoints" / "000000099").mkdir()  # an interrupted save: no marker
    args = [a.format(run=run_dir) for a in args]
    proc = dinolab("eval", "knn", f"run.dir={run_dir}", "workers=0", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def one_and_two_processes(tiny_run, tmp_path, protocol: str, args: list[str]):
    """`dinolab eval <protocol>` on two copies of the run: one process, and torchrun with 2 gloo
    processes. Returns (single run dir, DDP run dir, the DDP process)."""
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    for folder in (single_dir, ddp_dir):
        shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("eval"))
    single = dinolab("eval", protocol, f"run.dir={single_dir}", *args)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "launcher.cli", "eval", protocol, f"run.dir={ddp_dir}", *args],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return single_dir, ddp_dir, ddp


@pytest.mark.slow
def test_two_process_gloo_knn_equals_one_process(tiny_run, tmp_path):
    single_dir, ddp_dir, ddp = one_and_two_processes(
        tiny_run, tmp_path, "knn", ["workers=0", "shard_size=16", "batch_size=8", "device=cpu"]
    )
    assert ddp.stdout.count("k-NN (000000016)") == 1  # rank 0 prints
    (a,), (b,) = results(single_dir, "knn").values(), results(ddp_dir, "knn").values()
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert len(list((ddp_dir / "eval" / "features").rglob("shard_*.pt"))) == 8  # 4 + 4, each once
    # Each rank recorded the shards it encoded itself: together every shard, none twice, both worked.
    for split, shards in b["feature_shards"].items():
        assert shards["shards"] == 4 and len(shards["computed_by_rank"]) == 2, (split, shards)
        rank0, rank1 = map(set, shards["computed_by_rank"])
        assert rank0 | rank1 == {0, 1, 2, 3} and not rank0 & rank1 and rank0 and rank1, (split, shards)
    assert a["feature_shards"]["train"] == {"shards": 4, "computed_by_rank": [[0, 1, 2, 3]]}


@pytest.mark.slow
@pytest.mark.heavy
def test_two_process_gloo_linear_probe_equals_one_process(tiny_run, tmp_path):
    """Each rank augments only its share of a global batch; the summed update is one process's.
    Batch 9 of 64 images leaves a last batch of one image: rank 1 has nothing in it and still steps."""
    from dino.io import checkpoint

    args = ["workers=0", "shard_size=16", "batch_size=8", "device=cpu", "linear.epochs=2",
            "linear.batch_size=9", "linear.lr=0.5", "linear.n_last_blocks=2"]  # fmt: skip
    single_dir, ddp_dir, ddp = one_and_two_processes(tiny_run, tmp_path, "linear", args)
    assert ddp.stdout.count("linear probe (000000016)") == 1  # rank 0 prints
    (a,), (b,) = results(single_dir, "linear").values(), results(ddp_dir, "linear").values()
    assert a["num_train"] == b["num_train"] == 64 and b["finished"]
    heads = [checkpoint.load_latest(r["state_dir"]).state["head"] for r in (a, b)]
    for key in ("weight", "bias"):
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-5, atol=1e-6)
    for one, two in zip(a["history"], b["history"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)  # the global batch's loss, not a rank's
        assert two["top1"] == one["top1"]
