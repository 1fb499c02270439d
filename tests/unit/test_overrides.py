"""The one `key=value` parser of eval, viz and sweep edits (dino/config/overrides.py) and the one
"did you mean" (dino/config/suggest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from dino.config.overrides import apply, read_value, split, split_all
from dino.config.schema import ConfigError
from dino.config.suggest import did_you_mean, nearest, not_allowed, unknown_key


@pytest.mark.parametrize(
    "text",
    ["1e-3", "[10,20]", "0.5", "true", "", "x", "2024-01-01", "'a b'", "[knn.max_train=5000]", "1_000",
     ".5", "null", "3", "{a: 1}", "s3://bucket/a=b"],
)  # fmt: skip
def test_values_read_as_omegaconfs_dotlist_reads_them(text):
    """Eval and viz read their values as they did when they were an OmegaConf dotlist."""
    expected = OmegaConf.to_container(OmegaConf.from_dotlist([f"k={text}"]))["k"]
    value = read_value(text)
    assert value == expected and type(value) is type(expected)


def test_split_at_the_first_equals_sign():
    assert split("data.root=s3://b/k=v") == ("data.root", "s3://b/k=v")
    assert split("~train.seed") == ("~train.seed", None)
    assert split_all([" run.dir =r"]) == [("run.dir", "r")]
    with pytest.raises(
        ConfigError, match=r"override 'image' must look like key=value \(e.g. run.dir=runs/a\)"
    ):
        split_all(["image"])


@dataclass
class _Inner:
    k: list[int] = field(default_factory=lambda: [1])


@dataclass
class _Schema:
    inner: _Inner = field(default_factory=_Inner)
    lr: float = 0.1


def test_apply_merges_types_and_names_the_nearest_key():
    cfg = apply(_Schema, [("inner.k", "[5,6]"), ("lr", "1e-3")])
    assert cfg.inner.k == [5, 6] and cfg.lr == 0.001
    with pytest.raises(ConfigError, match="unknown config key 'inner.kk'; did you mean inner.k?"):
        apply(_Schema, [("inner.kk", "5")])
    with pytest.raises(ConfigError, match="^lr: "):
        apply(_Schema, [("lr", "fast")])
    with pytest.raises(ConfigError, match=r"^inner.k='\[5' is not a value YAML can read: "):
        apply(_Schema, [("inner.k", "[5")])


def test_one_did_you_mean():
    assert nearest("optim.epohcs", ["optim.epochs", "optim.lr"]) == "optim.epochs"
    assert nearest("zzz", ["optim.lr"]) is None
    assert did_you_mean("knnn", ["knn", "linear"]) == " (did you mean knn?)"
    assert did_you_mean("zzz", ["knn"]) == ""
    assert unknown_key("knn.kk", ["knn.k"]) == "unknown config key 'knn.kk'; did you mean knn.k?"
    assert unknown_key("zzz", ["knn.k"]) == "unknown config key 'zzz'"
    assert not_allowed("device", "cpu", ["auto", "cpu"]) is None
    assert not_allowed("device", "cpy", ["auto", "cpu"]) == (
        "device='cpy' is not allowed (did you mean cpu?); choose one of: auto, cpu"
    )
