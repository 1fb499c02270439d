import subprocess
import sys

import pytest

from dino.config.compose import compose
from dino.config.identity import config_hash, semantic_diff
from dino.config.schema import ConfigError, to_dict


def test_presets_compose_and_round_trip(tmp_path):
    cfg = compose(
        ["model=vit_small", "model.patch_size=8", "crops.num_local=6", "data=imagefolder", "data.root=/x"]
    )
    assert (cfg.model.name, cfg.model.patch_size, cfg.crops.num_local, cfg.data.root) == (
        "vit_small",
        8,
        6,
        "/x",
    )
    assert cfg.head.out_dim == 65536 and cfg.crops.global_size == 224


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.precision=bf17"],
            "train.precision='bf17' is not allowed (did you mean bf16?); choose one of: bf16, fp16, fp32",
        ),
        (["optim.epohcs=3"], "unknown config key 'optim.epohcs'; did you mean optim.epochs?"),
        (["model.patch_size=5"], "crops.global_size=224 must be a multiple of model.patch_size=5"),
        (
            ["model=vit_test", "crops.local_size=12"],
            "crops.local_size=12 must be a multiple of model.patch_size=8",
        ),
        (["data=imagefolder"], "data=imagefolder needs data.root"),
        (["optim.warmup_epochs=200"], "optim.warmup_epochs=200 must be between 0 and optim.epochs=100"),
        (["crops.local_scale=[0.5,0.1]"], "crops.local_scale=[0.5, 0.1] must be [low, high]"),
        (["teacher.momentum=1.5"], "teacher.momentum=1.5 must be in [0, 1]"),
        (["monitor.knn_every_steps=-1"], "monitor.knn_every_steps=-1 must be >= 0"),
        (
            ["data=imagefolder", "data.root=/x", "monitor.knn_every_epochs=1"],
            "monitor.knn_every_* with data=imagefolder needs monitor.val_root",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value)


def test_unknown_group_value_lists_the_options():
    with pytest.raises(ConfigError) as err:
        compose(["model=vit_smal"])
    assert "vit_small" in str(err.value) and "model" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="optim.epochs"):
        compose(["optim.epochs=many"])


WRONG_TYPES = [
    (
        "optim.batch_size=abc",
        "optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64",
    ),
    (
        "optim.batch_size=1.5",
        "optim.batch_size='1.5' is not an integer; expected int, e.g. optim.batch_size=64",
    ),
    ("optim.lr=fast", "optim.lr='fast' is not a number; expected float, e.g. optim.lr=0.0005"),
    (
        "train.compile=maybe",
        "train.compile='maybe' is not true or false; expected bool, e.g. train.compile=false",
    ),
    ("train.precision=[1]", "train.precision='[1]' is not a string; expected str, e.g. train.precision=bf16"),
    (
        "crops.global_scale=[a,b]",
        "crops.global_scale='[a,b]' is not a list of 2 numbers; expected tuple[float, float], "
        "e.g. crops.global_scale=[0.4,1.0]",
    ),
]


@pytest.mark.parametrize("override, message", WRONG_TYPES, ids=[o for o, _ in WRONG_TYPES])
def test_wrong_type_gives_the_key_the_value_and_the_expected_type(override, message):
    """OmegaConf's own line is "Value 'abc' of type 'str' could not be converted to Integer": no key as
    typed, no example."""
    with pytest.raises(ConfigError) as err:
        compose(["model=vit_test", override])
    assert str(err.value) == message


@pytest.mark.slow
def test_wrong_type_through_the_cli_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", "model=vit_test", "optim.batch_size=abc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dinolab train: error: optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64"
    ]
    assert not list(tmp_path.iterdir())  # refused before a run folder was made


def test_a_key_added_later_keeps_old_run_ids_at_its_old_behaviour():
    """data.augment_device came after runs existed: at its default the id and the resume comparison
    are those of a config without the key; another value is another run."""
    cfg = compose(["model=vit_test"])
    old = to_dict(cfg)
    del old["data"]["augment_device"]  # a config.yaml written before the key existed
    assert semantic_diff(old, cfg) == []
    assert config_hash(compose(["model=vit_test", "data.augment_device=gpu"])) != config_hash(cfg)
    assert semantic_diff(old, compose(["model=vit_test", "data.augment_device=gpu"]))


def test_run_ids_of_existing_runs_stay_what_they_were():
    """The id of the Fashion-MNIST run of the issue-3 measurements, computed before the `monitor`
    group existed: a new group or key must leave it (and every sweep's run folders) unchanged."""
    cfg = compose(["data=fashion_mnist", "model=vit_test", "crops.num_local=2", "head.out_dim=1024",
                   "optim.batch_size=32", "optim.warmup_epochs=0", "optim.lr=0.005", "train.precision=fp32",
                   "monitor.knn_every_steps=50"])  # fmt: skip
    assert config_hash(cfg) == "7462253f"


def test_hash_ignores_non_semantic_keys():
    a = compose(["run.dir=/a", "train.workers=2", "train.max_steps=5"])
    b = compose(["run.dir=/b", "train.workers=8", "train.log_every=1"])
    c = compose(["run.dir=/a", "crops.num_local=2"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert semantic_diff(to_dict(a), c) == ["crops.num_local: 10 -> 2"]
