"""Run ids are folder names on disk: these were computed before the configuration was split into
layers (issue 19) and must never change, whatever the code that computes them looks like."""

from __future__ import annotations

import pytest

from dino.config.compose import compose
from dino.config.identity import config_hash, semantic_diff
from dino.config.schema import DinoConfig, to_dict
from launcher.grid import expand
from launcher.sweep_file import load_sweep


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


def test_the_fields_marked_out_of_the_run_id_are_the_keys_that_always_were():
    """The marks on the fields (dino/config/schema.py) replace lists of key prefixes; these are those lists."""
    from dino.config.identity import is_semantic
    from dino.config.schema import flatten

    left_out = sorted(k for k in flatten(to_dict(DinoConfig())) if not is_semantic(k))
    sections = ("run.", "tracking.", "storage.", "monitor.")
    assert sorted(k for k in left_out if not k.startswith(sections)) == sorted(
        ["train.workers", "train.log_every", "train.max_steps", "train.checkpoint_every_steps",
         "train.checkpoint_every_minutes", "train.keep_last", "train.progress", "train.wait_for_lock",
         "train.device", "train.compile", "data.on_bad_image", "data.num_images", "train.collapse_stop",
         "train.collapse_patience_steps", "train.collapse_uniform_margin", "train.collapse_one_dim_fraction",
         "train.collapse_kl_flat", "train.collapse_kl_range",
         "train.hang_timeout_s", "train.on_code_change", "train.stop_at"]
    )  # fmt: skip
    assert all(not is_semantic(k) for k in ("run.dir", "tracking.uri", "storage.region", "monitor.knn_k"))
    assert is_semantic("train.removed_key") and is_semantic("optim.lr")  # an old checkpoint's keys count


def test_the_feature_cache_identity_of_eval_data_leaves_out_the_keys_the_schema_marks():
    from dino.eval.config import EvalDataConfig, data_identity

    kept = set(data_identity(EvalDataConfig()))
    assert set(to_dict(DinoConfig())["data"]) - kept == {"augment_device", "on_bad_image", "num_images"}
    assert "val_root" in kept
