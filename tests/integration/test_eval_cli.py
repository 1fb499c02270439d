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


# The pretraining of the Fashion-MNIST acceptance test and the k-NN subset it is judged on: the
# reference's schedule shape (warm-up 1 epoch, cosine lr / weight decay / momentum 0.996 -> 1) over 5
# epochs of the 60,000 images, a K = 4096 head, global batch 64 as 2 gloo processes x 32 (one 1-thread
# process per core), stopped at step 3500 (3.7 epochs: the k-NN gain is nearly all there; the full 5
# epochs add 0.7 points and 4.5 minutes). Shorter or compressed schedules do not beat the random init
# (docs/fashion-mnist-knn.md). No loader worker: with batched crops a worker only indexes the uint8
# array, and as a third process on two cores it slowed the pair (300 steps: 79 s -> 64 s without) for
# bit-identical batches.
FM_EPOCHS, FM_STEPS = 5, 3500
FM_PRETRAIN = [
    "data=fashion_mnist", "model=vit_test", "crops.global_size=32", "crops.local_size=16",
    "crops.num_local=2", "head.out_dim=4096", "head.hidden_dim=512", "head.bottleneck_dim=128",
    "optim.batch_size=32", f"optim.epochs={FM_EPOCHS}", "optim.warmup_epochs=1", "optim.lr=0.005",
    "teacher.momentum=0.996", "train.seed=1", f"train.max_steps={FM_STEPS}", "train.log_every=50", "train.workers=0",
    "train.precision=fp32", "train.device=cpu", "data.augment_device=gpu",
    "monitor.knn_every_epochs=1", "monitor.knn_train=10000", "monitor.knn_test=2000",
]  # fmt: skip
FM_KNN = ["workers=0", "knn.max_train=10000", "knn.max_test=2000", "knn.k=[20]"]
MIN_MARGIN = 2.0  # top-1 points: measured +3.95, less ~2 standard errors of a paired difference


@pytest.fixture(scope="module")
def fashion_mnist_run(tmp_path_factory):
    """3,500 steps of vit_test on Fashion-MNIST under torchrun (2 processes), shared by the loss test
    and the k-NN tests: about 11.5 minutes on the 2-core CI machine (hence the tests' longer timeout)."""
    if not FASHION_MNIST_ROOT.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    run_dir = tmp_path_factory.mktemp("fm") / "fm"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "launcher.cli", "train", *FM_PRETRAIN, f"run.dir={run_dir}"],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def fm_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first of these builds the 11.5-minute fixture
def test_fashion_mnist_loss_decreases_without_collapse(fashion_mnist_run):
    """3.7 epochs of vit_test on real Fashion-MNIST images.

    DINO's loss first rises while the center catches up with the teacher's logits (at step 0 the
    center is 0 and the teacher is very sharp), then falls: we check the fall from that peak, and
    that the teacher's entropy stays strictly between 0 (collapse to one prototype) and log K
    (collapse to uniform).
    """
    metrics = fm_metrics(fashion_mnist_run)
    losses = [m["loss"] for m in metrics]
    assert metrics[-1]["step"] == FM_STEPS and metrics[-1]["epoch"] == FM_STEPS / (60000 // 64)
    peak = max(losses[:10])
    assert sum(losses[-10:]) / 10 < peak - 0.3, losses  # measured: 7.96 -> 7.41
    for m in metrics:
        assert 0.05 < m["teacher_entropy"] < math.log(4096) - 0.05, m
    # the k-NN monitor ran after each epoch and at the end, on both processes' features (gathered)
    monitored = {m["step"]: m["monitor_knn_top1"] for m in metrics if "monitor_knn_top1" in m}
    assert sorted(monitored) == [937, 1874, 2811, FM_STEPS], monitored
    curve = list(monitored.values())
    assert all(10 < top1 < 100 for top1 in curve), curve
    print(f"Fashion-MNIST k-NN monitor per epoch: {curve}")


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
@pytest.mark.timeout(1500)  # the first of these builds the 11.5-minute fixture
def test_fashion_mnist_knn_separates_real_features_from_chance(fashion_mnist_knn):
    """Measured (2 cores, 10000 bank / 2000 queries): pixels 80.6, random init 59.5-61.35 by seed.
    Chance is 10: the protocol sees class structure, and pixels beat a random 2-block ViT clearly."""
    top1 = fashion_mnist_knn
    assert top1["random"] > 45 and top1["none"] > 45, top1
    assert top1["pixels"] > top1["random"] + 15, top1


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first of these builds the 11.5-minute fixture
def test_fashion_mnist_pretraining_beats_random_init(fashion_mnist_knn):
    """Issue 3's acceptance. Measured on the 2-core CI machine kind (10,000 bank / 2,000 queries, k = 20):
    random init 61.35, raw pixels 80.6, this run after 3,500 steps 65.3 (+3.95); after the full 5
    epochs 66.0 (+4.65). Single-process runs of the same recipe: +4.0 / +9.3 / +2.95 (seeds 0 / 1 / 2)."""
    top1 = fashion_mnist_knn
    assert top1["none"] >= top1["random"] + MIN_MARGIN, top1
