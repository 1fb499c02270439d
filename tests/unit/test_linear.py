"""Linear probe: features, init, schedule, exact resume after a kill, final vs best reporting."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dino.config.schema import ConfigError
from dino.eval import linear as lin
from dino.eval import probe
from dino.eval.encoders import cls_features, multi_block_features
from dino.eval.evaluated import resolve
from dino.eval.linear import evaluate_linear
from dino.eval.probe import build_head, cosine_lr
from dino.io import checkpoint
from dino.method.models import build_backbone


def probe_args(run_dir, *extra):
    return [
        f"run.dir={run_dir}", "workers=0", "shard_size=32", "batch_size=16", "linear.epochs=3",
        "linear.batch_size=16", "linear.lr=0.5", "linear.n_last_blocks=2", *extra,
    ]  # fmt: skip


def test_multi_block_features_concatenate_normed_cls_tokens_and_avgpool():
    torch.manual_seed(0)
    backbone = build_backbone("vit_test", 8, 32).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one = multi_block_features(backbone, images, 1, avgpool=False)
        two = multi_block_features(backbone, images, 2, avgpool=True)
        tokens = backbone.forward_features(images)
    torch.testing.assert_close(one, cls_features(backbone, images))  # last block's CLS after the norm
    assert two.shape == (3, 3 * 64)
    torch.testing.assert_close(two[:, 64:128], one)
    torch.testing.assert_close(two[:, 128:], tokens[:, 1:].mean(1))


def test_cosine_schedule_and_lr_scaling():
    assert cosine_lr(0.1, 0, 10) == 0.1
    assert math.isclose(cosine_lr(0.1, 5, 10), 0.05)
    assert cosine_lr(0.1, 10, 10) < 1e-12


def test_more_blocks_than_the_model_has_is_refused(trained_run):
    with pytest.raises(ConfigError, match="linear.n_last_blocks=4 exceeds the 2 blocks of vit_test"):
        evaluate_linear(*resolve([f"run.dir={trained_run}", "workers=0", "linear.epochs=1"]))


class Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_probe_resumes_to_the_same_weights(trained_run, tmp_path, monkeypatch):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    shutil.copytree(trained_run, full_dir)
    shutil.copytree(trained_run, killed_dir)
    full = evaluate_linear(*resolve(probe_args(full_dir)))
    assert full.finished and full.resumed_from is None and full.epoch == 3

    # A kill in the middle of epoch 2 (after epoch 1's checkpoint was written).
    real_evaluate = lin.evaluate
    calls = {"n": 0}

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(lin, "evaluate", dying_evaluate)
    with pytest.raises(Killed):
        evaluate_linear(*resolve(probe_args(killed_dir)))
    monkeypatch.setattr(lin, "evaluate", real_evaluate)
    state_dirs = list((killed_dir / "eval" / "linear").iterdir())
    assert checkpoint.complete_steps(str(state_dirs[0])) == [1]

    # And a stop by max_epochs in the middle, then the rest.
    stopped = evaluate_linear(*resolve(probe_args(killed_dir, "linear.max_epochs=2")))
    assert stopped.resumed_from == 1 and stopped.epoch == 2 and not stopped.finished
    resumed = evaluate_linear(*resolve(probe_args(killed_dir)))
    assert resumed.resumed_from == 2 and resumed.finished
    for key, value in full.weights.items():
        assert torch.equal(value, resumed.weights[key]), key
    assert resumed.record["history"] == full.record["history"]


def test_probe_init_result_and_provenance(trained_run, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    result = evaluate_linear(*resolve(probe_args(run_dir, "linear.epochs=2", "linear.avgpool=true")))
    saved = json.loads(Path(result.path).read_text())
    assert saved["feature_dim"] == 3 * 64 and saved["num_train"] == 64 and saved["num_test"] == 64
    assert saved["checkpoint"].endswith("000000016") and saved["step"] == 16 and saved["config_hash"]
    assert saved["final"]["epoch"] == 2 and saved["final"]["top1"] == saved["history"][-1]["top1"]
    best = max(h["top1"] for h in saved["history"])
    assert saved["best_over_epochs"]["top1"] == best
    # lr = 0.5 * 16 / 256 at epoch 0; cosine over 2 epochs.
    assert saved["history"][0]["lr"] == pytest.approx(0.5 * 16 / 256)
    assert saved["history"][1]["lr"] == pytest.approx(0.5 * 16 / 256 * 0.5)
    # The test features were extracted once and cached beside the k-NN ones.
    assert list((run_dir / "eval" / "features" / "000000016").glob("test-last2-avgpool-*/shard_*.pt"))


def test_probe_initialisation_is_normal_001_with_zero_bias_from_the_seed():
    head = build_head(384, 1000, seed=0)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert head.weight.mean().abs().item() < 1e-3 and torch.count_nonzero(head.bias) == 0
    assert torch.equal(head.weight, build_head(384, 1000, seed=0).weight)
    assert not torch.equal(head.weight, build_head(384, 1000, seed=1).weight)


def test_pixels_baseline_cannot_be_probed(trained_run):
    with pytest.raises(ConfigError, match="baseline=pixels has no backbone"):
        evaluate_linear(*resolve([f"run.dir={trained_run}", "baseline=pixels"]))


class CountingViews(torch.utils.data.Dataset):
    """(epoch, index) -> (index as an image, label); remembers which images were asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __getitem__(self, key):
        self.asked.append(key[1])
        return torch.full((1,), float(key[1])), key[1] % 3


def test_each_rank_decodes_only_its_part_of_every_global_batch():
    batches = probe.epoch_batches(21, 8, seed=0, epoch=0)  # 8 + 8 + 5 images
    assert [len(b) for b in batches] == [8, 8, 5]
    seen = {}
    for rank in range(3):
        views = CountingViews()
        parts = list(probe.rank_batches(views, batches, rank, 3, 0, torch.device("cpu")))
        assert [n for _, _, n in parts] == [8, 8, 5]  # every rank takes every step
        seen[rank] = [[] if x is None else x.flatten().int().tolist() for x, _, _ in parts]
        assert sorted(views.asked) == sorted(i for part in seen[rank] for i in part)  # nothing else decoded
    for b, batch in enumerate(batches):
        indices = [i for _, i in batch]
        assert sorted(i for rank in range(3) for i in seen[rank][b]) == sorted(indices)
        assert seen[0][b] == indices[0::3]


def test_a_one_element_lr_grid_is_todays_single_probe(trained_run, tmp_path):
    single_dir, grid_dir = tmp_path / "single", tmp_path / "grid"
    shutil.copytree(trained_run, single_dir)
    shutil.copytree(trained_run, grid_dir)
    single = evaluate_linear(*resolve(probe_args(single_dir, "linear.epochs=2")))
    cfg, target = resolve(probe_args(grid_dir, "linear.epochs=2", "linear.lr=[0.5]"))
    assert lin.probe_id(cfg) == lin.probe_id(resolve(probe_args(single_dir, "linear.epochs=2"))[0])
    grid = evaluate_linear(cfg, target)
    for key, value in single.weights.items():
        assert torch.equal(value, grid.weights[key]), key
    assert grid.record["history"] == single.record["history"] and "lr_grid" not in grid.record
    assert grid.record["num_train"] == 64  # nothing held out for a single lr


@pytest.mark.slow
def test_an_lr_grid_trains_every_head_on_the_same_features_and_chooses_on_held_out_data(
    trained_run, tmp_path
):
    run_dir, resumed_dir = tmp_path / "g", tmp_path / "resumed"
    shutil.copytree(trained_run, run_dir)
    shutil.copytree(trained_run, resumed_dir)
    grid = ["linear.epochs=2", "linear.lr=[0.005,0.5,50.0]", "linear.val_fraction=0.25"]
    result = evaluate_linear(*resolve(probe_args(run_dir, *grid)))
    saved = json.loads(Path(result.path).read_text())
    heads = saved["lr_grid"]["heads"]
    assert [h["lr"] for h in heads] == [0.005, 0.5, 50.0]
    best = max(heads, key=lambda h: h["val_top1"])
    assert saved["lr_grid"]["chosen_lr"] == best["lr"]  # chosen on the held-out part, not on test
    assert saved["final"]["top1"] == best["top1"] and saved["num_train"] == 48  # 16 of 64 held out
    assert saved["lr_grid"]["chosen_on"] == "held-out 0.25 of the train split (16 images)"
    assert len({h["top1"] for h in heads} | {h["val_top1"] for h in heads}) > 2  # the heads differ

    # Resumable as a whole: all heads are in the probe's checkpoint.
    stopped = evaluate_linear(*resolve(probe_args(resumed_dir, *grid, "linear.max_epochs=1")))
    assert not stopped.finished
    resumed = evaluate_linear(*resolve(probe_args(resumed_dir, *grid)))
    assert resumed.resumed_from == 1
    assert json.loads(Path(resumed.path).read_text())["lr_grid"] == saved["lr_grid"]
    for key, value in result.weights.items():
        assert torch.equal(value, resumed.weights[key]), key
