"""The train loop on vit_test: exact resume, refusals, non-finite loss, run directory contents."""

import json
import math

import pytest
import torch
import yaml

from dino.io import checkpoint
from dino.run.train import ConfigMismatchError, run
from dino.run.train_metrics import NonFiniteLossError
from tests.conftest import load_final


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["cpu", pytest.param("gpu", marks=pytest.mark.heavy)])
def test_exact_resume_gives_identical_weights(tmp_path, tiny_cfg, augment):
    """Per-image augmentation in the workers (cpu) or batched on the training device (gpu: here the
    CPU runs the same batched code): 16 steps with drop path on (the RNG must be restored too)."""
    extra = f"data.augment_device={augment}"
    full = run(tiny_cfg(extra, "train.workers=2", run_dir=tmp_path / "full"))
    assert full.finished and full.step == 16

    half = run(tiny_cfg(extra, "train.max_steps=8", run_dir=tmp_path / "split"))
    assert half.step == 8 and not half.finished
    resumed = run(tiny_cfg(extra, run_dir=tmp_path / "split"))
    assert resumed.resumed_from == 8 and resumed.finished

    a, b = load_final(tmp_path / "full"), load_final(tmp_path / "split")
    assert a["step"] == b["step"] == 16
    for part in ("student", "teacher", "loss"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"


def test_run_directory_holds_config_metrics_checkpoints_and_log(tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.checkpoint_every_steps=4", "train.keep_last=2")
    result = run(cfg)
    run_dir = tmp_path / "run"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "vit_test" and saved["run"]["dir"] == str(run_dir)
    assert checkpoint.complete_steps(str(run_dir)) == [12, 16]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines][-1] == 16
    for key in (
        "loss",
        "teacher_entropy",
        "kl",
        "lr",
        "weight_decay",
        "momentum",
        "teacher_temp",
        "img_per_s",
        "memory_gib",
    ):
        assert all(math.isfinite(m[key]) for m in lines), key
    assert 0 < lines[-1]["teacher_entropy"] < math.log(cfg.head.out_dim)
    state = load_final(run_dir)
    assert state["data_position"] == {"epoch": 2, "batch_in_epoch": 0, "steps_per_epoch": 8}
    assert set(state) >= {"student", "teacher", "optimizer", "scaler", "loss", "rng", "config", "step"}
    assert "checkpoint" in (run_dir / "train.log").read_text()
    assert result.last_metrics["step"] == 16
    # Started again: nothing to do, nothing overwritten.
    mtime = (run_dir / "checkpoints" / "000000016" / "state.pt").stat().st_mtime_ns
    again = run(cfg)
    assert again.resumed_from == 16 and again.step == 16
    assert (run_dir / "checkpoints" / "000000016" / "state.pt").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_resume_skips_a_corrupt_checkpoint_for_the_previous_complete_one(tmp_path, tiny_cfg, caplog):
    run(tiny_cfg("train.max_steps=8", "train.checkpoint_every_steps=4"))
    state = tmp_path / "run" / "checkpoints" / "000000008" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    resumed = run(tiny_cfg("train.max_steps=10", "train.checkpoint_every_steps=4"))
    assert resumed.resumed_from == 4
    assert "000000008 is corrupt" in (tmp_path / "run" / "train.log").read_text()


def test_another_config_in_the_same_run_dir_is_refused_with_the_keys(tmp_path, tiny_cfg):
    run(tiny_cfg("train.max_steps=2"))
    with pytest.raises(ConfigMismatchError) as err:
        run(tiny_cfg("crops.num_local=4", "optim.lr=0.001"))
    assert "crops.num_local: 2 -> 4" in str(err.value) and "optim.lr: 0.0005 -> 0.001" in str(err.value)
    # Keys that cannot change the result may differ.
    assert run(tiny_cfg("train.max_steps=3", "train.workers=1", "train.log_every=1")).resumed_from == 2


def test_checkpoint_of_another_config_is_refused(tmp_path, tiny_cfg):
    run(tiny_cfg("train.max_steps=2"))
    (tmp_path / "run" / "config.yaml").unlink()  # only the checkpoint tells now
    with pytest.raises(
        ConfigMismatchError, match="written by another config: teacher.momentum: 0.996 -> 0.9"
    ):
        run(tiny_cfg("teacher.momentum=0.9"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_cfg):
    # An absurd learning rate: the first steps of warm-up are finite, then the weights blow up.
    cfg = tiny_cfg(
        "optim.lr=1e36", "optim.clip_grad=0", "train.log_every=1", "train.checkpoint_every_steps=1"
    )
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg)
    message = str(err.value)
    assert "loss is not finite at step" in message and "Last good checkpoint" in message
    bad_step = int(message.split("at step ")[1].split()[0])
    steps = checkpoint.complete_steps(str(tmp_path / "run"))
    assert steps and steps[-1] <= bad_step
    good = checkpoint.load_latest(str(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in good.state["student"].values())


def test_compiled_models_keep_the_checkpoint_keys(tiny_cfg):
    """train.compile compiles the backbones in place: state dict keys (and so checkpoints) are unchanged."""
    from dino.run.build import build_state

    plain = build_state(tiny_cfg(), torch.device("cpu"))
    compiled = build_state(tiny_cfg("train.compile=true"), torch.device("cpu"))
    for a, b in ((plain.student, compiled.student), (plain.teacher, compiled.teacher)):
        assert list(a.state_dict()) == list(b.state_dict())
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )
    assert compiled.student.backbone._compiled_call_impl is not None


@pytest.mark.slow
def test_the_knn_monitor_logs_a_curve_without_changing_training(tmp_path, tiny_cfg):
    """k-NN of the live teacher every 6 steps and at the end of each process, on the whole synthetic
    train (bank) and test (query) splits: the final value is what `dinolab eval knn` measures on the
    final checkpoint, and the weights are those of a run without the monitor, interrupted or not
    (the monitor's data loader workers must not move training's random stream)."""
    from dino.eval.knn import run_knn

    plain = run(tiny_cfg("train.workers=2", run_dir=tmp_path / "plain"))
    monitor = ["monitor.knn_every_steps=6", "monitor.knn_train=64", "monitor.knn_test=64", "monitor.knn_k=5"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monitor.append(f"tracking.uri={uri}")
    run(tiny_cfg(*monitor, "train.workers=2", "train.max_steps=8", run_dir=tmp_path / "mon"))
    resumed = run(tiny_cfg(*monitor, "train.workers=2", run_dir=tmp_path / "mon"))
    assert plain.finished and resumed.finished and resumed.resumed_from == 8

    a, b = load_final(tmp_path / "plain"), load_final(tmp_path / "mon")
    for part in ("student", "teacher", "loss"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    lines = [json.loads(line) for line in (tmp_path / "mon" / "metrics.jsonl").read_text().splitlines()]
    curve = {m["step"]: m["monitor_knn_top1"] for m in lines if "monitor_knn_top1" in m}
    assert sorted(curve) == [6, 8, 12, 16], lines
    # Each monitor step is also a full training-metrics line (one line per step for MLflow's backfill).
    assert all("loss" in m for m in lines if "monitor_knn_top1" in m)
    assert "monitor_knn_top1" not in (tmp_path / "plain" / "metrics.jsonl").read_text()
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "mon" / "tracking.json").read_text())["run_id"]
    history = MlflowClient(uri).get_metric_history(run_id, "monitor_knn_top1")
    assert {m.step: m.value for m in history} == curve  # the learning curve in the run's MLflow page
    evaluated = run_knn([f"run.dir={tmp_path / 'mon'}", "knn.k=[5]", "workers=0", "device=cpu"])
    assert curve[16] == pytest.approx(evaluated.top1[5], abs=1e-9)
