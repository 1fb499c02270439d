"""Probe ids name linear probe folders on disk (`<target>-<data>-<probe id>`): an existing probe
resumes only if its id is the same. These were computed with `probe_id` reading its own
`NON_SEMANTIC` tuple, before the probe config's fields were marked, and must never change."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dino.config.identity import identity_items, marked_fields
from dino.config.schema import added_later, not_in_run_id
from dino.eval.config import LinearConfig, compose_eval
from dino.eval.linear import probe_id


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "930991d4"),
        (["linear.lr=[0.0001,0.001,0.01]"], "b00fc8e9"),
        (["linear.lr=[0.0001,0.001,0.01]", "linear.val_fraction=0.2"], "192a9fea"),
        (["linear.max_train=1000", "linear.max_test=500"], "d73e4e19"),
        (["linear.max_test=500"], "bd9afcc2"),
        (["linear.batch_size=512"], "4433f1c4"),
        (["linear.scale=[0.2,1.0]"], "b55c4789"),
        (["seed=1", "image_size=224"], "82375bc1"),
        (["linear.lr=1"], "06356595"),
        (["linear.lr=1.0"], "06356595"),  # an int lr is the float it stands for
        # What cannot change the probe: the default's id.
        (["linear.max_epochs=5"], "930991d4"),  # stopping earlier is the same probe, to be continued
        (["linear.lr=[0.001]"], "930991d4"),  # a one-element grid is the single probe
        (["linear.val_fraction=0.3"], "930991d4"),  # no held-out part without a grid
    ],
)  # fmt: skip
def test_known_probe_ids(overrides, expected):
    assert probe_id(compose_eval(["run.dir=runs/x", *overrides])) == expected


def test_the_marked_probe_fields_are_the_one_left_out_before():
    assert marked_fields(LinearConfig) == {"max_epochs"}


@dataclass
class _Section:
    a: int = 1
    b: int = not_in_run_id(2)


@dataclass
class _Config:
    x: float = 0.5
    new: str = added_later("old")
    section: _Section = field(default_factory=_Section)
    skipped: _Section = not_in_run_id(default_factory=_Section)


def test_identity_items_read_the_marks_of_any_config_dataclass():
    assert identity_items(_Config()) == {"x": 0.5, "section.a": 1}
    assert identity_items(_Config(new="changed")) == {"x": 0.5, "new": "changed", "section.a": 1}
