"""launcher/cost/'s arithmetic: images per stage, GPU-hours, wall-clock with array parallelism, cards,
the order of trust of the sources and the budget check. No MLflow, no training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launcher import cost
from launcher.cost import speeds
from launcher.cost.sweep_cost import (
    _dataset_size,
    _devices,
    _eval_images,
    _pretrain_images,
    _Size,
    _stage_card,
    _wall_hours,
)
from launcher.grid import expand
from launcher.sweep_file import load_sweep
from tests.conftest import TINY_OVERRIDES


def sweep_file(tmp_path: Path, **content) -> Path:
    data = {
        "name": "c",
        "root": str(tmp_path / "root"),
        "base": list(TINY_OVERRIDES),
        "grid": {"optim.batch_size": [8, 4]},
        "tracking_uri": "none",
        "array_parallelism": 2,
    }
    data.update(content)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def _flop_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_pretrain_images_count_whole_global_batches_as_the_train_loop(tmp_path):
    (run,) = expand(load_sweep(sweep_file(tmp_path, grid={"optim.batch_size": [8]})))
    cfg = run.config  # 64 synthetic images, batch 8, 2 epochs
    assert _pretrain_images(cfg, 1).images == 2 * 8 * 8
    assert _pretrain_images(cfg, 3).images == 2 * (64 // 24) * 24  # the remainder of an epoch is dropped
    cfg.train.max_steps = 5
    assert _pretrain_images(cfg, 1).images == 5 * 8


def test_gpu_hours_and_wall_clock_of_a_stage():
    speed = cost.Speed(100.0, 2.0, speeds.MEASURED, "")
    stage = cost.StageCost("pretrain", 3_600_000, 16, speed)
    assert stage.gpu_hours == pytest.approx(10.0)  # 3.6M images at 100 img/s per GPU
    assert stage.hours == pytest.approx(10.0 / 16)  # spread over 2 nodes x 8 GPUs
    assert cost.StageCost("pretrain", None, 1, speed).gpu_hours is None  # dataset size unknown


def test_a_jobs_fixed_seconds_are_its_warm_up_and_monitor_and_count_once_a_job(monkeypatch, tmp_path):
    """The train loop logs `job_fixed_s` (its first window's seconds over the steady rate, plus the
    monitor); a measured speed carries the median and a stage adds it once per job, on each GPU."""
    import torch

    from dino.run import train_metrics

    clock = [100.0]
    monkeypatch.setattr(train_metrics.time, "monotonic", lambda: clock[0])
    schedules = SimpleNamespace(
        lr=[0.1] * 40, weight_decay=[0.0] * 40, momentum=[0.99] * 40, teacher_temp=[0.04] * 40
    )
    window = train_metrics.MetricsWindow(torch.device("cpu"), schedules, 10, 8, 1, 40, str(tmp_path))
    out = {"loss": torch.tensor(1.0), "teacher_entropy": torch.tensor(1.0), "kl": torch.tensor(0.0)}

    def steps(end: int, seconds: float) -> dict[str, float]:
        for step in range(end - 9, end + 1):
            window.add(out, step)
        clock[0] += seconds
        return window.reduce(end, {})

    assert steps(10, 5.0)["job_fixed_s"] == 0.0  # the warm-up is not priced before a steady window
    clock[0] += 2.0  # the k-NN monitor: outside img/s, inside GPU-hours and the job's fixed seconds
    window.pause(2.0)
    line = steps(20, 1.0)  # 80 images a second: the first window's 80 should have taken 1 s, not 5
    assert line["job_fixed_s"] == pytest.approx(4.0 + 2.0) and line["avg_img_per_s"] == pytest.approx(80)
    assert line["gpu_hours"] == pytest.approx(8.0 / 3600)
    assert steps(30, 3.0)["job_fixed_s"] == pytest.approx(5.0 - 2.0 + 2.0)  # now 40 img/s on average

    # Figures that predict a sum: 1,200 images a run at 100, 200 and 300 img/s take 12 + 6 + 4 s, the
    # harmonic mean's 3,600 / 164 (a median of 200 would say 18 s); fixed seconds by their mean.
    hits = [
        (("s",), 100.0, None, "e", 30.0),
        (("s",), 200.0, None, "e", 10.0),
        (("s",), 300.0, None, "e", None),
    ]
    speed = speeds.measured_speed(("s",), hits)
    assert speed.img_per_s == pytest.approx(3600 / 22) and speed.detail.startswith("mean of 3 run(s) in e")
    assert speed.fixed_s == 20.0 and "+ 20 s per job" in speed.detail  # runs logged before it: left out
    stage = cost.StageCost("pretrain", 3_600_000, 16, speed)
    assert stage.fixed_gpu_hours == pytest.approx(20 * 16 / 3600)
    assert stage.gpu_hours == pytest.approx(3_600_000 / (3600 / 22) / 3600 + 20 * 16 / 3600)
    assert speeds.measured_speed(("s",), hits[2:]).fixed_s == 0.0


def test_wall_clock_runs_array_parallelism_jobs_at_a_time_and_chains_evaluations(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, grid={"optim.batch_size": [8, 4, 2]}, evals=["knn"]))
    runs = expand(sweep)
    one_hour = cost.Speed(1.0, None, speeds.ESTIMATED, "")
    costs = [
        cost.RunCost(
            r,
            [
                cost.StageCost("pretrain", 3600, 1, one_hour),
                cost.StageCost("knn", 1800, 1, one_hour),
            ],
        )
        for r in runs
    ]
    # Parallelism 2: pretraining runs 1 and 2 in [0, 1] h, run 3 in [1, 2] h; its k-NN [2, 2.5] h.
    assert _wall_hours(sweep, costs) == pytest.approx(2.5)
    sweep.array_parallelism = 3
    assert _wall_hours(sweep, costs) == pytest.approx(1.5)


def test_the_card_comes_from_the_config_and_the_resources(tmp_path):
    sweep = load_sweep(
        sweep_file(
            tmp_path,
            resources={
                "pretrain": {"gpus_per_node": 8, "tasks_per_node": 8, "nodes": 2, "constraint": "h100"},
                "knn": {"gpus_per_node": 1},
            },
        )  # fmt: skip
    )
    assert _stage_card(sweep, "pretrain", "auto") == "H100"
    assert _stage_card(sweep, "pretrain", "cpu") == "cpu"  # train.device=cpu asks for no GPU
    assert _stage_card(sweep, "knn", "auto") == speeds.UNKNOWN_GPU
    assert _devices(sweep, "pretrain") == 16 and _devices(sweep, "knn") == 1


def test_a_measured_shape_wins_over_a_calibration_which_wins_over_a_flop_estimate(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path))
    big, small = expand(sweep)
    shape = speeds.shape_of(big.config, "cpu")
    measured = [(shape, 500.0, 1.0, "elsewhere", None)]
    bench = {speeds._bench_key(shape): {"img_per_s": 300.0, "memory_gib": 1.5, "device": "cpu", "time": 0}}
    assert speeds.measured_speed(shape, measured).img_per_s == 500.0
    assert (
        speeds.measured_speed(speeds.shape_of(small.config, "cpu"), measured) is None
    )  # batch 4: another shape
    assert speeds.measured_speed(speeds.shape_of(big.config, "H100"), measured) is None  # another card
    assert speeds.calibrated_speed(shape, bench).source == speeds.CALIBRATED
    guess = speeds.estimated_speed(big.config, "cpu", 1)
    assert guess.source == speeds.ESTIMATED and guess.detail.startswith("guess:")
    flops = speeds._train_flops(big.config)["flops"]
    assert guess.img_per_s == pytest.approx(speeds._CPU_FLOPS_PER_THREAD / flops)


def test_flops_per_image_match_the_reference_step():
    """ViT-S/16, 2x224 + 10x96, K=65536: 124 GFLOP per image (ANCHORS, one H200 step)."""
    from dino.config.compose import compose

    counted = speeds._train_flops(compose(["model=vit_small"]))
    assert counted["flops"] / 1e9 == pytest.approx(124, rel=0.02)


def test_evaluation_images_are_bank_and_queries_or_epochs_of_the_train_split(tmp_path):
    from dino.eval.config import compose_eval

    data = {"name": "fashion_mnist", "root": "/x"}
    knn = compose_eval(["knn.max_train=2000", "run.dir=r"], data)
    assert _eval_images("knn", knn).images == 2000 + 10000
    linear = compose_eval(["linear.epochs=3", "run.dir=r"], data)
    assert _eval_images("linear", linear).images == 10000 + 3 * 60000


def test_the_budget_refuses_naming_the_most_expensive_runs(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, grid={"optim.batch_size": [8, 4, 2, 1]}))
    costs = [
        cost.RunCost(
            r,
            [cost.StageCost("pretrain", 3600 * (i + 1), 1, cost.Speed(1.0, None, speeds.MEASURED, ""))],
        )
        for i, r in enumerate(expand(sweep))
    ]
    total = cost.SweepCost(costs, None)
    assert total.gpu_hours == pytest.approx(10.0)
    cost.check_budget(sweep, total, 10.0, "--max-gpu-hours")  # at the limit: allowed
    with pytest.raises(cost.BudgetExceeded) as err:
        cost.check_budget(sweep, total, 9.5, "--max-gpu-hours")
    message = str(err.value)
    assert "estimated at 10.0 GPU-hours" in message and "over --max-gpu-hours of 9.5" in message
    assert "most expensive: batch_size1 (4, measured), batch_size2 (3, measured)" in message
    assert "Nothing was submitted" in message
    unknown = cost.SweepCost([cost.RunCost(costs[0].run, [cost.StageCost("pretrain", None, 1, costs[0].stages[0].speed)])], None)  # fmt: skip
    with pytest.raises(cost.BudgetExceeded, match="have no estimate"):
        cost.check_budget(sweep, unknown, 100.0, "the sweep's budget")


def test_budget_is_validated_in_the_sweep_file(tmp_path):
    from launcher.sweep_file import SweepError

    assert load_sweep(sweep_file(tmp_path, budget=12.5)).budget == 12.5
    with pytest.raises(SweepError, match="budget: '-1' must be GPU-hours"):
        load_sweep(sweep_file(tmp_path, budget=-1))


def test_data_num_images_prices_a_dataset_that_is_not_here_and_the_count_on_disk_wins(tmp_path):
    from dino.config.schema import DataConfig
    from dino.eval.config import EvalDataConfig

    missing = str(tmp_path / "not-mounted")
    size = _dataset_size(DataConfig(name="imagefolder", root=missing, num_images=1000), "train")
    assert size.images == 1000 and size.why == ""
    assert size.notes == (f"data.root {missing} is not readable here: data.num_images=1,000 used",)

    folder = tmp_path / "here"
    (folder / "cls").mkdir(parents=True)
    for name in ("a.jpg", "b.png", "c.JPEG", "notes.txt"):
        (folder / "cls" / name).write_bytes(b"")
    size = _dataset_size(DataConfig(name="imagefolder", root=str(folder), num_images=5), "train")
    assert size.images == 3  # the files on disk, not the declared 5, and a note says so
    assert size.notes == (
        f"data.num_images=5 but data.root {folder} holds 3 images here: the count on disk is used",
    )
    assert _dataset_size(DataConfig(name="imagefolder", root=str(folder), num_images=3), "train").notes == ()

    # {train, val}: val is data.val_root, the evaluations' test split; without it that split is unknown.
    data = EvalDataConfig(
        name="imagefolder", root=missing, val_root=missing + "-val", num_images={"train": 1000, "val": 50}
    )
    assert _dataset_size(data, "test").images == 50
    assert _dataset_size(data, "train").images == 1000
    data.num_images = 1000
    test = _dataset_size(data, "test")
    assert test.images is None
    assert test.why == (
        f"data.val_root '{missing}-val' is not readable here, so its size is unknown: "
        "set data.num_images={train: <N>, val: <M>} to price it"
    )
    for wrong in ("many", {"train": 0}, {"tarin": 5}, True):
        data = DataConfig(name="webdataset", root=missing, num_images=wrong)
        assert "is not an integer or {train: N, val: M}" in _dataset_size(data, "train").why
    unknown = _dataset_size(DataConfig(name="imagefolder", root=missing + "2"), "train")
    assert unknown.images is None and unknown.why.endswith("set data.num_images=<N> to price it")


def test_a_plain_num_images_counts_the_train_split_only():
    """data.num_images=N is data.root's train split: Fashion-MNIST's test split (no data.val_root) is
    counted as it is, with no note comparing it with N."""
    from dino.config.schema import DataConfig

    root = "/usr/share/datasets/fashion-mnist"
    data = DataConfig(name="fashion_mnist", root=root, num_images=60000)
    assert _dataset_size(data, "test") == _Size(10000)
    data = DataConfig(name="fashion_mnist", root=root, num_images=5)
    assert _dataset_size(data, "train").notes == (
        f"data.num_images=5 but data.root {root} holds 60,000 images here: the count on disk is used",
    )
    assert _dataset_size(data, "test") == _Size(10000)
    wrong = _dataset_size(DataConfig(name="fashion_mnist", root=root, num_images="abc"), "train")
    assert wrong.images == 60000 and wrong.notes == (
        "data.num_images='abc' is not an integer or {train: N, val: M} (positive counts): ignored, "
        f"data.root {root} holds 60,000 images here",
    )
