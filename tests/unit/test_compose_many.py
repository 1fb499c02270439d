"""The sweep's composer (dino/config/compose_many.py) gives exactly what `compose` (what `dinolab train`
and the job run) gives, per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from dino.config.compose import compose
from dino.config.compose_many import ConfigComposer
from dino.config.identity import config_hash
from dino.config.schema import ConfigError, to_dict
from launcher.grid import expand
from launcher.sweep import load_sweep

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_to_the_configs_and_ids_of_compose(sweep_file, tmp_path):
    # The cluster sweeps need a dataset folder (only its name matters here).
    runs = expand(load_sweep(sweep_file, [f"root={tmp_path}", "data.root=/datasets/imagenet/train"]))
    for run in runs:
        slow = compose(run.overrides)  # the job composes exactly these overrides
        assert to_dict(run.config) == to_dict(slow), run.name
        assert run.run_id == config_hash(slow), run.name


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=vit_test", "optim.lr=1", "teacher.momentum=1"],  # ints into float keys
        ["model=vit_test", "crops.global_scale=[0.5,1]", "crops.num_local=0"],  # a list, ints in it
        ["data=fashion_mnist", "model=vit_tiny", "model.patch_size=8", "head.norm_last_layer=false"],
        ["model.patch_size=8", "model=vit_test"],  # a preset chosen after a value: applied first
        [
            "optim.lr=0.002",
            "optim.min_lr=${optim.lr}",
            "tracking.experiment=e-${model.name}",
            "model=vit_test",
        ],  # interpolations
        ["tracking.uri=", "optim.epochs=010", "tracking.experiment=yes"],  # empty, decimal, text as typed
        ["tracking.experiment='a b'", "tracking.uri=sqlite:////tmp/x.db", "data.root=/data/my images"],
        ["train.precision=bf16", "optim.batch_size=7", "train.seed=3", "train.seed=4"],  # last wins
    ],
)
def test_mixed_overrides_match_compose(overrides):
    composer = ConfigComposer()
    composer.compose(["model=vit_small"])  # a cache filled by another preset first
    fast = composer.compose(overrides, {"run.dir": "/runs/x", "tracking.run_name": "x"})
    slow = compose([*overrides, "run.dir=/runs/x", "tracking.run_name=x"])
    assert to_dict(fast) == to_dict(slow)
    assert config_hash(fast) == config_hash(slow)


def test_what_it_cannot_mirror_goes_to_compose_with_its_message():
    composer = ConfigComposer()
    with pytest.raises(ConfigError) as fast:
        composer.compose(["optim.batch_size=abc"])
    with pytest.raises(ConfigError) as slow:
        compose(["optim.batch_size=abc"])
    assert str(fast.value) == str(slow.value) and "is not an integer" in str(fast.value)
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        composer.compose(["optim.lrr=0.1"])


def test_runs_do_not_share_list_values():
    composer = ConfigComposer()
    a = composer.compose(["crops.global_scale=[0.5,1.0]"])
    b = composer.compose(["crops.global_scale=[0.5,1.0]"])
    a.crops.global_scale[0] = 0.9
    assert b.crops.global_scale[0] == 0.5


def test_a_mapping_value_is_the_value_given_not_merged_with_an_earlier_runs():
    composer = ConfigComposer()
    first = composer.compose(["data.num_images={train: 5, val: 3}"])
    second = composer.compose(["data.num_images={train: 9}"])
    assert first.data.num_images == {"train": 5, "val": 3}
    assert second.data.num_images == {"train": 9} == compose(["data.num_images={train: 9}"]).data.num_images
