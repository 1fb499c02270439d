"""Run ids are folder names on disk: these were computed before the configuration was split into
layers (issue 19) and must never change, whatever the code that computes them looks like."""

from __future__ import annotations

import pytest

from dino.config import DinoConfig, to_dict
from dino.config_compose import compose
from dino.run_identity import config_hash, semantic_diff
from launcher.sweep import expand, load_sweep


@pytest.mark.parametrize(
    ("overrides", "run_id"),
    [
        ([], "abf07d7c"),
        (["train.init_weights=/w/dino.pth"], "a09648ec"),
        (["train.init_weights=/w/dino.pth", "train.init_weights_key=student"], "f1a8f79f"),
        (["data.augment_device=cpu"], "2c88554f"),
        (["model=vit_test", "data=fashion_mnist", "optim.lr=0.01"], "7db09c1c"),
        # Keys that cannot change a result: the default's id.
        (["run.dir=x", "train.workers=9", "data.on_bad_image=fail", "tracking.experiment=zz",
          "monitor.knn_k=3", "train.collapse_stop=false", "storage.region=eu"], "abf07d7c"),
    ],
)  # fmt: skip
def test_known_run_ids(overrides, run_id):
    assert config_hash(compose(overrides)) == run_id


def test_the_default_dataclasses_and_an_old_checkpoints_dict_keep_their_id():
    assert config_hash(DinoConfig()) == "abf07d7c"
    old = to_dict(DinoConfig())  # saved before these keys existed
    del old["data"]["augment_device"], old["train"]["init_weights"], old["monitor"]
    del old["train"]["collapse_stop"]
    assert config_hash(old) == "abf07d7c"
    changed = compose(["train.init_weights=/w", "optim.lr=0.1", "train.workers=2"])
    assert semantic_diff(old, changed) == [
        "optim.lr: 0.0005 -> 0.1",
        "train.init_weights: '<missing>' -> '/w'",
    ]


def test_known_sweep_run_ids(monkeypatch):
    monkeypatch.setenv("USER", "me")
    labels = {
        "quickstart": ["m0.996-nl0-bs32-e173c222", "m0.996-nl2-bs24-4522d317", "m0.9-nl0-bs32-e34a4f38",
                       "m0.9-nl2-bs24-bc563b8c"],
        "momentum": ["m0.996-20c989e1", "m0.99-4b656857", "m0.9-9ce65da3", "m0.0-57ae9390"],
        "patch_size": ["ps16-bs64-20c989e1", "ps8-bs32-638142c9"],
    }  # fmt: skip
    for name, expected in labels.items():
        assert [r.label for r in expand(load_sweep(f"sweeps/{name}.yaml"))] == expected
