"""Issue 3's acceptance: a short DINO pretraining of vit_test on Fashion-MNIST beats its random init.

The pretraining (tests/integration/fashion_mnist_run.py) starts in the background when the session
begins; these tests run last and judge it with the real `dinolab eval knn`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.conftest import FM_FOLDER_ENV, FM_RUN
from tests.integration.cli import dinolab, results
from tests.integration.fashion_mnist_run import FM_STEPS, BackgroundRun

pytestmark = pytest.mark.acceptance

FM_KNN = ["workers=0", "knn.max_train=10000", "knn.max_test=2000", "knn.k=[20]"]
MIN_MARGIN = 2.0  # top-1 points: measured +5.65 (+3.95 on the first 10,000 / 2,000 images)


@pytest.fixture(scope="module")
def fashion_mnist_run(request, tmp_path_factory, fashion_mnist):
    """3,500 steps of vit_test on Fashion-MNIST under torchrun (2 processes), started by
    tests/conftest.py when the session began (by the xdist controller into $DINOLAB_TEST_FM_FOLDER,
    or here if it was not), shared by the tests below."""
    run = request.config.stash.get(FM_RUN, None)
    if run is None and os.environ.get(FM_FOLDER_ENV):
        run = BackgroundRun(Path(os.environ[FM_FOLDER_ENV]) / "fm")
        run = run if run.was_started else None
    if run is None:
        run = BackgroundRun(tmp_path_factory.mktemp("fm") / "fm").start()
    return run.wait()


def fm_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first of these may still wait for the background run
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
@pytest.mark.timeout(1800)  # the first of these may still wait for the background run
def test_fashion_mnist_knn_separates_real_features_from_chance(fashion_mnist_knn):
    """Measured (10,000 bank / 2,000 queries, evenly spaced): pixels 81.4, random init 60.75.
    Chance is 10: the protocol sees class structure, and pixels beat a random 2-block ViT clearly."""
    top1 = fashion_mnist_knn
    assert top1["random"] > 45 and top1["none"] > 45, top1
    assert top1["pixels"] > top1["random"] + 15, top1


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first of these may still wait for the background run
def test_fashion_mnist_pretraining_beats_random_init(fashion_mnist_knn):
    """Issue 3's acceptance. Measured on the 2-core CI machine kind (10,000 / 2,000 evenly spaced
    images, k = 20): random init 60.75, raw pixels 81.4, this run after 3,500 steps 66.4 (+5.65).
    Single-process runs of the same recipe: +4.0 / +9.3 / +2.95 (seeds 0 / 1 / 2)."""
    top1 = fashion_mnist_knn
    assert top1["none"] >= top1["random"] + MIN_MARGIN, top1


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first of these may still wait for the background run
def test_eval_knn_and_the_training_monitor_agree(fashion_mnist_run, fashion_mnist_knn):
    """Same weights, same evenly spaced subsets, same vote: `dinolab eval knn` (one process) and the
    monitor (2 processes, features gathered) give the same top-1 (measured: 66.4 and 66.4)."""
    monitored = [m for m in fm_metrics(fashion_mnist_run) if "monitor_knn_top1" in m]
    assert monitored[-1]["step"] == FM_STEPS
    assert abs(monitored[-1]["monitor_knn_top1"] - fashion_mnist_knn["none"]) <= 0.1  # 2 of 2,000 queries
