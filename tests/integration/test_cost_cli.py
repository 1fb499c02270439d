"""Cost before submitting, through the real `dinolab` commands (in this process, to keep CI short):
`sweep plan` on a sweep whose twin already ran (measured), a fresh shape (estimated), after
`bench --save` (calibrated); `submit --max-gpu-hours` / `budget:` refusing and allowing; `status`
and `report --runs` showing the estimate beside the GPU-hours spent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dino.io import mlflow_store
from launcher import records
from launcher.cli import main
from tests.conftest import TINY_OVERRIDES, tiny_config


@pytest.fixture(autouse=True)
def _flop_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a cold FLOP cache: really counted


def write_sweep(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "cost.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "cost",
                "root": str(root),
                "base": [*TINY_OVERRIDES, "train.progress=false"],
                "grid": {"optim.batch_size": [8, 4]},  # 8: the twin's shape; 4: a fresh one
                "evals": ["knn"],
                "resources": {"pretrain": {"cpus_per_task": 1}, "knn": {"cpus_per_task": 1}},
            }
        )
    )
    return path


def dinolab(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def row(out: str, run: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(f"│ {run} ") and "GiB" in line]
    return line


def test_plan_uses_a_measured_twin_then_a_bench_calibration_then_a_flop_guess(tmp_path, capsys):
    from dino.run.train import run

    root = tmp_path / "root"
    uri = mlflow_store.sqlite_uri(str(root))
    # The twin: a run of the bs8 shape, in another experiment of the sweep's store; 5 steps are
    # enough for a throughput (train.max_steps changes neither the shape nor the run's identity).
    run(
        tiny_config(
            tmp_path / "twin", f"tracking.uri={uri}", "tracking.experiment=elsewhere", "train.max_steps=5"
        )
    )
    twin = mlflow_store.client(uri).search_runs(
        [mlflow_store.client(uri).get_experiment_by_name("elsewhere").experiment_id]
    )[0]
    assert twin.data.tags["dinolab.card"] == "cpu"
    rate = twin.data.metrics["avg_img_per_s"]
    sweep = write_sweep(tmp_path, root)

    code, out, err = dinolab(capsys, "sweep", "plan", str(sweep))
    assert code == 0, err
    measured, fresh = row(out, "batch_size8"), row(out, "batch_size4")
    assert f"{rate:,.0f}" in measured and measured.rstrip(" │").endswith("measured")
    assert fresh.rstrip(" │").endswith("estimated")
    assert (
        f"pretrain of batch_size8: measured, {rate:,.0f} img/s per GPU: mean of 1 run(s) in elsewhere, + "
        in out
    )
    fixed = twin.data.metrics["job_fixed_s"]  # what the twin's job paid once: added to each job's cost
    assert f"+ {fixed:.3g} s per job" in out
    assert "pretrain of batch_size4: estimated, " in out and "GFLOP/image" in out
    assert "knn of batch_size8, batch_size4: estimated, " in out
    assert "cost: " in out and "GPU-hours (pretrain " in out and "wall-clock " in out

    code, _, err = dinolab(capsys, "bench", *TINY_OVERRIDES, "optim.batch_size=4", "--warmup", "0",
                           "--steps", "1", "--input", "synthetic", "--json", "--save", str(root))  # fmt: skip
    assert code == 0 and f"calibration saved to {root / 'bench.json'}" in err
    code, out, err = dinolab(capsys, "sweep", "plan", str(sweep))
    assert code == 0, err
    assert row(out, "batch_size4").rstrip(" │").endswith("calibrated")
    assert row(out, "batch_size8").rstrip(" │").endswith("measured")  # measured still wins
    assert "img/s per GPU: dinolab bench " in out and "pretrain of batch_size4: calibrated, " in out


def test_max_gpu_hours_refuses_an_over_budget_submission_and_submits_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    sweep = write_sweep(tmp_path, root)
    code, _, err = dinolab(
        capsys, "sweep", "submit", str(sweep), "--executor", "debug", "--max-gpu-hours", "1e-6"
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "GPU-hours for 2 run(s), over --max-gpu-hours of 1e-06" in line
    assert "most expensive: batch_size" in line and "Nothing was submitted" in line
    assert not root.exists()  # no run folder, record.json, jobs.json, .submitit or MLflow store

    code, _, err = dinolab(capsys, "sweep", "submit", str(sweep), "budget=1e-6", "--executor", "debug")
    assert code == 2 and "over the sweep's budget of 1e-06" in err and not root.exists()


def test_a_submission_within_budget_is_queued_with_its_estimate_for_status_and_report(tmp_path, capsys):
    root = tmp_path / "root"
    sweep = write_sweep(tmp_path, root)
    code, out, err = dinolab(
        capsys, "sweep", "submit", str(sweep), "--executor", "debug", "--max-gpu-hours", "100"
    )
    assert code == 0, err
    assert "submitted 2 pretraining job(s)" in out and "cost: " in out
    run_dirs = sorted(
        p for p in (root / "cost").iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "code"
    )
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert [j["stage"] for j in records.read_jobs(str(run_dir))] == ["pretrain", "knn"]
        record = json.loads((run_dir / "record.json").read_text())
        assert record["estimate_gpu_hours"] > 0 and record["estimate_source"] == "estimated"

    records.update_record(str(run_dirs[0]), gpu_hours=0.25)  # as the job reports it
    code, out, err = dinolab(capsys, "sweep", "status", str(sweep))
    assert code == 0, err
    assert "GPU-h spent/est." in out and "0.25 / " in out and "(estimated)" in out

    code, out, err = dinolab(capsys, "report", str(sweep), "--runs")
    assert code == 0, err
    assert "est_gpu_hours" in out and "est_source" in out and out.count("estimated") == 2


REPO = Path(__file__).resolve().parents[2]


def test_plan_prices_the_imagenet_sweep_where_imagenet_is_not_mounted(tmp_path, capsys, monkeypatch):
    """sweeps/patch_size.yaml sets data.num_images (ImageNet-1k: 1,281,167 train, 50,000 val): without
    the dataset here every run still has a GPU-hours figure, and the plan says where it comes from."""
    monkeypatch.setenv("USER", "me")
    code, out, err = dinolab(
        capsys, "sweep", "plan", str(REPO / "sweeps" / "patch_size.yaml"), f"root={tmp_path}"
    )
    assert code == 0, err
    for run in ("ps16-bs64", "ps8-bs32"):
        assert re.match(rf"│ {run} +│ [\d,.]+ +│ [\d.]+ [hd] ", row(out, run)), row(out, run)
    (cost,) = [line for line in out.splitlines() if line.startswith("cost: ")]
    assert "unknown" not in cost and "linear " in cost
    if not Path("/datasets/imagenet/train").exists():
        assert (
            "note: data.root /datasets/imagenet/train is not readable here: data.num_images.train=1,281,167 used"
            in out
        )
        assert (
            "note: data.val_root /datasets/imagenet/val is not readable here: data.num_images.val=50,000 used"
            in out
        )


def test_an_image_folder_that_is_not_here_names_the_key_that_prices_it(tmp_path, capsys):
    root, missing = tmp_path / "root", tmp_path / "not-mounted"
    base = [o for o in TINY_OVERRIDES if not o.startswith("data")] + [
        "data=imagefolder",
        f"data.root={missing}",
    ]
    sweep = tmp_path / "folder.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "folder", "root": str(root), "base": base, "grid": {"optim.batch_size": [8, 4]}, "evals": ["knn"],
        "eval_overrides": {"knn": [f"data.val_root={missing}-val"]}, "tracking_uri": "none",
    }))  # fmt: skip

    code, out, err = dinolab(capsys, "sweep", "plan", str(sweep))
    assert code == 0, err
    assert "cost: at least 0 (2 run(s) of unknown cost)" in out and row(out, "batch_size8").startswith(
        "│ batch_size8 │ ? "
    )
    assert (
        f"  unknown: batch_size8 pretrain: data.root '{missing}' is not readable here, so its size is unknown: "
        "set data.num_images=<N> to price it"
    ) in out
    code, _, err = dinolab(
        capsys, "sweep", "submit", str(sweep), "--executor", "debug", "--max-gpu-hours", "10"
    )
    assert (
        code == 2
        and "set data.num_images=<N> to price it); nothing was submitted" in err
        and not root.exists()
    )

    # N prices data.root (pretraining, the k-NN bank); data.val_root needs {train: N, val: M}.
    code, out, err = dinolab(capsys, "sweep", "plan", str(sweep), "data.num_images=640")
    assert code == 0, err
    assert f"note: data.root {missing} is not readable here: data.num_images=640 used" in out
    assert (
        f"  unknown: batch_size8 knn: data.val_root '{missing}-val' is not readable here, so its size is unknown: "
        "set data.num_images={train: <N>, val: <M>} to price it"
    ) in out
    code, out, err = dinolab(capsys, "sweep", "plan", str(sweep), "data.num_images={train: 640, val: 64}")
    assert code == 0, err
    (cost,) = [line for line in out.splitlines() if line.startswith("cost: ")]
    assert "unknown" not in cost and "knn " in cost and "?" not in row(out, "batch_size4")
