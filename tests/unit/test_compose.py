"""The one composer (dino/config/compose.py) gives what OmegaConf gives (the Hydra base of the chosen
presets, then `overrides.apply` of the values), per run, id included; a sweep's job receives that
config as a plain dict and reads it back on its node, where `${oc.env:...}` values are resolved."""

from __future__ import annotations

import functools
import pickle
import sys
import types
from pathlib import Path

import pytest
import yaml

from dino.config import compose as composing
from dino.config.compose import Composer, compose, from_job_dict, job_dict, preset_groups, preset_name
from dino.config.identity import config_hash
from dino.config.overrides import apply, split_all
from dino.config.schema import ConfigError, DinoConfig, to_dict
from dino.config.validate import validate
from launcher import records
from launcher.grid import expand
from launcher.jobs import TrainJob
from launcher.sweep_file import load_sweep

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))


@functools.cache
def _hydra_base(choices: tuple[tuple[str, str], ...]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="dino_schema", node=DinoConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dino.conf", version_base="1.3"):
            composed = hydra_compose(config_name="config", overrides=[f"{g}={n}" for g, n in choices])
        return OmegaConf.to_container(composed, resolve=False)
    finally:
        GlobalHydra.instance().clear()


def reference(overrides: list[str]) -> DinoConfig:
    """The config as OmegaConf composes it: no cache, no mirror."""
    chosen, values = {}, []
    for key, text in split_all(overrides):
        if key in preset_groups():
            chosen[key] = preset_name(text)
        else:
            values.append((key, text))
    cfg = apply(DinoConfig, values, _hydra_base(tuple(sorted(chosen.items()))))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_to_the_configs_and_ids_of_omegaconf(sweep_file, tmp_path):
    # The cluster sweeps need a dataset folder (only its name matters here).
    runs = expand(load_sweep(sweep_file, [f"root={tmp_path}", "data.root=/datasets/imagenet/train"]))
    for run in runs:
        expected = reference([*run.overrides, f"run.dir={run.run_dir}"])
        assert to_dict(run.config) == to_dict(expected), run.name
        assert run.run_id == config_hash(expected), run.name
        assert to_dict(from_job_dict(run.job_config())) == to_dict(expected), run.name  # what the job gets


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
        ["model='vit_test'", "tracking.experiment=???", "tracking.run_name=x"],  # ??? : OmegaConf's "missing"
        ["optim={lr: 0.01, epochs: 30}", "data.num_images={train: 5}"],  # a section, a mapping value
    ],
)
def test_mixed_overrides_match_omegaconf(overrides):
    composer = Composer()
    composer.compose(["model=vit_small"])  # a cache filled by another preset first
    values = composer.values(overrides)
    planned = composer.build({**values.flat, "run.dir": "/runs/x"})
    expected = reference([*overrides, "run.dir=/runs/x"])
    assert to_dict(planned) == to_dict(expected)
    assert values.run_id == config_hash(expected)
    assert to_dict(compose(overrides)) == to_dict(reference(overrides))


def test_presets_are_composed_once_per_choice_and_each_value_read_once(monkeypatch):
    hydra, read = [], []
    monkeypatch.setattr(
        composing, "_hydra_compose", lambda choices: hydra.append(choices) or _hydra_base(choices)
    )
    real_read = composing.read_value
    monkeypatch.setattr(composing, "read_value", lambda text: read.append(text) or real_read(text))
    composer = Composer()
    for lr in ("0.1", "0.2", "0.1"):
        for seed in (0, 1):
            composer.compose(["model=vit_test", f"optim.lr={lr}", f"train.seed={seed}"])
    composer.compose(["model=vit_tiny", "optim.lr=0.1"])
    assert hydra == [(("model", "vit_test"),), (("model", "vit_tiny"),)]
    assert sorted(read) == ["0", "0.1", "0.2", "1"]


def test_what_it_cannot_mirror_goes_through_omegaconf_with_its_message():
    composer = Composer()
    with pytest.raises(ConfigError) as mirrored:
        composer.compose(["optim.batch_size=abc"])
    with pytest.raises(ConfigError) as expected:
        reference(["optim.batch_size=abc"])
    assert str(mirrored.value) == str(expected.value)
    assert (
        str(mirrored.value)
        == "optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64"
    )
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        composer.compose(["optim.lrr=0.1"])


def test_runs_do_not_share_list_or_mapping_values():
    composer = Composer()
    a = composer.compose(["crops.global_scale=[0.5,1.0]", "data.num_images={train: 5}"])
    b = composer.compose(["crops.global_scale=[0.5,1.0]", "data.num_images={train: 5}"])
    a.crops.global_scale[0] = 0.9
    a.data.num_images["train"] = 7
    assert b.crops.global_scale[0] == 0.5 and b.data.num_images == {"train": 5}


def test_a_mapping_value_is_the_value_given_not_merged_with_an_earlier_runs():
    composer = Composer()
    first = composer.compose(["data.num_images={train: 5, val: 3}"])
    second = composer.compose(["data.num_images={train: 9}"])
    assert first.data.num_images == {"train": 5, "val": 3}
    assert second.data.num_images == {"train": 9} == reference(["data.num_images={train: 9}"]).data.num_images


def test_environment_values_travel_as_expressions_and_are_read_on_the_node(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("DINOLAB_WORKERS", "2")
    overrides = ["run.dir=/x/rank${oc.env:RANK}", "train.workers=${oc.env:DINOLAB_WORKERS}",
                 "tracking.experiment=${run.dir}", "optim.min_lr=${optim.lr}", "tracking.run_name='\\${x}'"]  # fmt: skip
    values = Composer().values(overrides)
    planned = Composer().build(values.flat)
    assert (planned.run.dir, planned.train.workers, planned.tracking.run_name) == ("/x/rank0", 2, "${x}")
    data = job_dict(planned, values.on_node)
    # What reads the environment stays an expression, and so does what interpolates it (run.dir);
    # an interpolation of planned values only is resolved to the same value either way.
    assert (
        data["run"]["dir"] == "/x/rank${oc.env:RANK}"
        and data["train"]["workers"] == "${oc.env:DINOLAB_WORKERS}"
    )
    assert data["tracking"]["experiment"] == "${run.dir}"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("DINOLAB_WORKERS", "5")
    on_node = from_job_dict(pickle.loads(pickle.dumps(data)))
    assert (on_node.run.dir, on_node.train.workers, on_node.tracking.experiment) == (
        "/x/rank3",
        5,
        "/x/rank3",
    )
    assert (on_node.optim.min_lr, on_node.tracking.run_name) == (
        planned.optim.min_lr,
        "${x}",
    )  # text stays text
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="RANK"):
        from_job_dict(data)
    assert job_dict(compose(["optim.lr=0.1"]), {}) == to_dict(compose(["optim.lr=0.1"]))  # nothing to resolve
    text = compose(["tracking.run_name='\\${x}'"])  # no environment value: everything resolved here
    assert from_job_dict(job_dict(text, {})).tracking.run_name == text.tracking.run_name == "${x}"


def _sweep(tmp_path: Path, base: list[str]):
    path = tmp_path / "sweep.yaml"
    content = {"name": "s", "root": str(tmp_path / "root"), "base": ["model=vit_test", *base],
               "grid": {"optim.lr": [0.001, 0.002]}, "evals": []}  # fmt: skip
    path.write_text(yaml.safe_dump(content))
    return load_sweep(path)


def test_the_planner_sets_run_dir_once_and_keeps_environment_values_for_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_DATA", "/planner")
    runs = expand(
        _sweep(tmp_path, ["data.root=${oc.env:DINOLAB_DATA}/x", "run.dir=/ignored/${oc.env:DINOLAB_DATA}"])
    )
    for run in runs:
        assert f"run.dir={run.run_dir}" not in run.overrides  # set once, in the config, not appended
        assert run.config.run.dir == run.run_dir == str(tmp_path / "root" / "s" / f"{run.name}-{run.run_id}")
        assert run.config.data.root == "/planner/x"
        job = run.job_config()
        assert job["run"]["dir"] == run.run_dir  # the planner's folder, not the overrides' expression
        assert job["data"]["root"] == "${oc.env:DINOLAB_DATA}/x"
        monkeypatch.setenv("DINOLAB_DATA", "/node")
        assert from_job_dict(job).data.root == "/node/x"
        monkeypatch.setenv("DINOLAB_DATA", "/planner")


class _Finished:
    collapsed, finished, step, total_steps = None, True, 16, 16


def test_the_job_trains_the_planned_config_and_requeues_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_WORKERS", "2")
    run = expand(_sweep(tmp_path, ["train.workers=${oc.env:DINOLAB_WORKERS}"]))[0]
    job = TrainJob(run.job_config(), run.run_dir)
    size = len(pickle.dumps(job))
    assert size < 4000, size  # what submitit pickles per run: the config, no override to compose
    trained = []
    fake = types.ModuleType("dino.run.train")
    fake.run = lambda cfg, **_: trained.append(cfg) or _Finished()
    monkeypatch.setitem(sys.modules, "dino.run.train", fake)  # no training: the config it is given
    monkeypatch.setenv("DINOLAB_WORKERS", "5")
    unpickled = pickle.loads(pickle.dumps(job))
    assert unpickled() == {"run_dir": run.run_dir, "step": 16, "finished": True}
    (cfg,) = trained
    assert cfg.train.workers == 5  # read on the node
    assert to_dict(cfg) == to_dict(run.config) | {"train": to_dict(run.config.train) | {"workers": 5}}
    assert records.read_record(run.run_dir)["state"] == records.COMPLETED
    requeued = unpickled.checkpoint().function  # USR2: a fresh job of the same spec
    assert requeued == job and requeued is not unpickled and requeued._thread is None
    assert pickle.loads(pickle.dumps(requeued)) == job


def test_a_job_pickled_with_overrides_before_the_upgrade_still_runs_its_config(tmp_path):
    """A job queued by a dinolab whose jobs composed their own config (pickled with `overrides`, no
    `config`) and requeued after an upgrade composes the same config on the node."""
    run = expand(_sweep(tmp_path, []))[0]
    old = TrainJob(run.job_config(), run.run_dir).__getstate__()
    old.pop("config")
    old["overrides"] = [*run.overrides, f"run.dir={run.run_dir}"]
    legacy = TrainJob.__new__(TrainJob)
    legacy.__setstate__(old)
    assert to_dict(from_job_dict(legacy.config)) == to_dict(run.config)
