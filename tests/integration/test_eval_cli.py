"""`dinolab eval` and `dinolab viz` as a user runs them: real processes, torchrun, Fashion-MNIST."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import FASHION_MNIST_ROOT
from tests.integration.cli import REPO, TINY, dinolab, env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_cli") / "run"
    proc = dinolab("train", *TINY, "train.workers=0", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir


def results(run_dir, protocol):
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "eval" / protocol).glob("*.json")}


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


@pytest.mark.slow
def test_two_process_gloo_knn_equals_one_process(tiny_run, tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    for folder in (single_dir, ddp_dir):
        shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("eval"))
    args = ["workers=0", "shard_size=16", "batch_size=8", "device=cpu"]
    single = dinolab("eval", "knn", f"run.dir={single_dir}", *args)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "launcher.cli", "eval", "knn", f"run.dir={ddp_dir}", *args],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("k-NN (000000016)") == 1  # rank 0 prints
    (a,), (b,) = results(single_dir, "knn").values(), results(ddp_dir, "knn").values()
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert len(list((ddp_dir / "eval" / "features").rglob("shard_*.pt"))) == 8  # 4 + 4, each once


# The pretraining of the Fashion-MNIST acceptance test and the k-NN subset it is judged on.
FM_PRETRAIN = [
    "data=fashion_mnist", "model=vit_test", "crops.global_size=32", "crops.local_size=16",
    "crops.num_local=2", "head.out_dim=1024", "optim.batch_size=32", "optim.epochs=100",
    "optim.warmup_epochs=0", "optim.lr=0.005", "train.max_steps=200", "train.log_every=10", "train.workers=1",
    "train.precision=fp32", "train.device=cpu", "data.augment_device=gpu",
]  # fmt: skip
FM_KNN = ["workers=0", "knn.max_train=10000", "knn.max_test=2000", "knn.k=[20]"]
MIN_MARGIN = 3.0  # top-1 points; the standard error of one accuracy on 2000 queries is about 1.1


@pytest.fixture(scope="module")
def fashion_mnist_run(tmp_path_factory):
    """One 200-step `dinolab train` of vit_test on Fashion-MNIST (about 40 s on 2 cores with the
    batched crops, 90 s with per-image crops), shared by the loss test and the k-NN tests."""
    if not FASHION_MNIST_ROOT.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    run_dir = tmp_path_factory.mktemp("fm") / "fm"
    proc = dinolab("train", *FM_PRETRAIN, f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_fashion_mnist_loss_decreases_without_collapse(fashion_mnist_run):
    """200 steps of vit_test on real Fashion-MNIST images.

    DINO's loss first rises while the center catches up with the teacher's logits (at step 0 the
    center is 0 and the teacher is very sharp), then falls: we check the fall from that peak, and
    that the teacher's entropy stays strictly between 0 (collapse to one prototype) and log K
    (collapse to uniform).
    """
    metrics = [json.loads(line) for line in (fashion_mnist_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert metrics[-1]["step"] == 200 and len(losses) == 20
    peak = max(losses[:8])
    assert sum(losses[-3:]) / 3 < peak - 0.8, losses
    assert sum(losses[-5:]) / 5 < sum(losses[8:13]) / 5, losses
    for m in metrics:
        assert 0.05 < m["teacher_entropy"] < math.log(1024) - 0.05, m


@pytest.fixture(scope="module")
def fashion_mnist_knn(fashion_mnist_run):
    """k-NN top-1 (k=20) of the Fashion-MNIST run, of its random initialisation and of raw pixels,
    all through `dinolab eval knn`."""
    run_dir = fashion_mnist_run
    top1 = {}
    for baseline in ("none", "random", "pixels"):
        proc = dinolab("eval", "knn", f"run.dir={run_dir}", f"baseline={baseline}", *FM_KNN)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (record,) = [r for r in results(run_dir, "knn").values() if r["baseline"] == baseline]
        assert record["num_train"] == 10000 and record["num_test"] == 2000
        top1[baseline] = record["top1"]["20"]
    print(f"Fashion-MNIST k-NN top-1 (k=20): {top1}")
    return top1


@pytest.mark.slow
def test_fashion_mnist_knn_separates_real_features_from_chance(fashion_mnist_knn):
    """Measured (2 cores, 10000 bank / 2000 queries): pixels 80.6, random init 59.5, 200 steps 57.0.
    Chance is 10: the protocol sees class structure, and pixels beat a random 2-block ViT clearly."""
    top1 = fashion_mnist_knn
    assert top1["random"] > 45 and top1["none"] > 45, top1
    assert top1["pixels"] > top1["random"] + 15, top1


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured on 2 cores (10000 bank / 2000 queries, k=20): 200 steps of vit_test with schedules "
    "spanning 100 epochs give 57.0 (56.5 with per-image crops) against 59.5 for the random init. 27 variants up to 1250 steps "
    "(momentum 0.9-0.996, lr, compressed schedules, frozen/free last layer, teacher temp, K, crop "
    "scales, multi-crop, batch 128, patch 4; seeds 0-2) stay within -10..+5 of their random init, and "
    "no variant beats it on every seed (the best, +5.0 on seed 0, is +0.5 and +1.2 on seeds 1 and 2): "
    "a 5-epoch run (18 min on 2 cores, too long for CI) reaches +9.3 on seed 1: "
    "see docs/fashion-mnist-knn.md and the issue-3 note",
)
def test_fashion_mnist_pretraining_beats_random_init(fashion_mnist_knn):
    top1 = fashion_mnist_knn
    assert top1["none"] >= top1["random"] + MIN_MARGIN, top1
