"""The one `key=value` parser of train, sweeps, eval, viz and sweep edits (dino/config/overrides.py)
and the one "did you mean" (dino/config/suggest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from dino.config.overrides import apply, read_value, split, split_all
from dino.config.schema import ConfigError
from dino.config.suggest import did_you_mean, nearest, not_allowed, unknown_key


@pytest.mark.parametrize(
    "text",
    ["1e-3", "[10,20]", "0.5", "true", "x", "2024-01-01", "'a b'", "[knn.max_train=5000]", "1_000",
     ".5", "null", "3", "{a: 1}", "s3://bucket/a=b"],
)  # fmt: skip
def test_values_read_as_omegaconfs_dotlist_reads_them(text):
    """Eval and viz read their values as they did when they were an OmegaConf dotlist."""
    expected = OmegaConf.to_container(OmegaConf.from_dotlist([f"k={text}"]))["k"]
    value = read_value(text)
    assert value == expected and type(value) is type(expected)


READ_AS_TYPED = [
    ("", ""), ("010", 10), ("[yes, 010]", ["yes", 10]), ("yes", "yes"), ("off", "off"), ("0x1F", "0x1F"),
    ("12:30", "12:30"), ("a #b", "a #b"), ("|", "|"), ("@x", "@x"), ("a: b", "a: b"), ("-1", -1),
    ("${oc.env:RANK}", "${oc.env:RANK}"), (".inf", float("inf")), ("~", None), ("True", True),
]  # fmt: skip


@pytest.mark.parametrize("text, value", READ_AS_TYPED, ids=[t or "empty" for t, _ in READ_AS_TYPED])
def test_values_are_read_as_train_read_them_with_hydras_grammar(text, value):
    """`key=` is the empty string (gpu_bench's `tracking.uri=`), 010 is ten, and YAML 1.1's other
    scalars (yes, 0x1F, 12:30, comments, block markers) stay the text that was typed."""
    read = read_value(text)
    assert read == value and type(read) is type(value)


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
    with pytest.raises(ConfigError) as err:
        apply(_Schema, [("lr", "fast")])
    assert str(err.value) == "lr='fast' is not a number; expected float, e.g. lr=0.1"
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


def test_train_reads_values_with_the_same_parser(monkeypatch):
    """Train's overrides are read like eval's: `=` inside a value, YAML numbers, env interpolation;
    presets are picked with the same syntax and a wrong preset or a form without `=` is one line."""
    from dino.config.compose import compose
    from dino.config.identity import config_hash

    monkeypatch.setenv("RANK", "3")
    cfg = compose(
        ["data.root=s3://b/k=v", "optim.lr=1e-3", "run.dir=/r/rank${oc.env:RANK}", "model='vit_test'"]
    )
    assert (cfg.data.root, cfg.optim.lr, cfg.run.dir, cfg.model.name) == (
        "s3://b/k=v",
        0.001,
        "/r/rank3",
        "vit_test",
    )
    with pytest.raises(ConfigError) as err:
        compose(["model=vit_smal"])
    assert str(err.value) == (
        "model='vit_smal' is not allowed (did you mean vit_small?); choose one of: vit_base, vit_small, vit_test, vit_tiny"
    )
    with pytest.raises(ConfigError, match=r"^override '~train.seed' must look like key=value"):
        compose(["~train.seed"])
    with pytest.raises(ConfigError, match=r"^model='\[a' is not allowed; choose one of: vit_base"):
        compose(["model=[a"])  # a preset is a name, not a YAML value: no traceback
    assert compose(["tracking.uri="]).tracking.uri == ""
    assert config_hash(compose(["optim.epochs=010"])) == config_hash(compose(["optim.epochs=10"]))
    with pytest.raises(ConfigError, match=r"^unknown config key '\+optim.lr'; did you mean optim.lr\?"):
        compose(["+optim.lr=1"])
