"""Sweep files (`sweeps/*.yaml`) -> validated `Sweep` -> one `RunSpec` per grid point and seed.

A sweep file is a diff: base overrides plus axes. Every run's config is composed with the same Hydra
compose API as `dinolab train`, so a typo fails here, at `plan`, with the file, the key and the
nearest valid name. A run's id is the hash of its resolved config without non-semantic keys, so the
same grid point always lands in the same folder: `<root>/<sweep name>/<run name>-<id>/`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dino.config.overrides import read_value
from dino.config.overrides import split as split_override
from dino.config.schema import TRACKING_SCHEMES, ConfigError, DinoConfig, flatten, to_dict
from dino.config.suggest import did_you_mean
from dino.io import mlflow_store, storage
from launcher.sweep_checks import SweepError, check_gpus, check_types, expand_env, yaml_error

EVALS = ("knn", "linear")


@dataclass
class Resources:
    """What one job of a stage asks the scheduler for (submitit/SLURM parameter names)."""

    partition: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: float = 4
    timeout_min: int = 60
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 120
    additional: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    name: str
    path: str
    root: str = "runs"
    base: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    short_names: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Resources] = field(default_factory=dict)
    array_parallelism: int = 4
    max_timeouts: int = 3
    evals: list[str] = field(default_factory=list)
    eval_overrides: dict[str, list[str]] = field(default_factory=dict)
    tracking_uri: str = "default"
    """MLflow store: "default" = sqlite:///<root>/mlflow.db, "none" = off, or a server URL."""
    budget: float = 0
    """GPU-hours a submission may cost at most (its estimate, launcher/cost/estimate.py); 0 = no limit."""
    logs_root: str = ""
    """Shared-filesystem folder for what the scheduler needs as files (submitit logs and scripts,
    local slot locks, the default SQLite store): empty = root for a local root, ~/dinolab for s3://."""

    @property
    def folder(self) -> str:
        return storage.join(self.root, self.name)

    @property
    def local_root(self) -> str:
        """Where scheduler files go: a POSIX path even when the runs live in an object store."""
        if self.logs_root:
            return self.logs_root
        return os.path.expanduser("~/dinolab") if storage.is_remote(self.root) else self.root

    @property
    def local_folder(self) -> str:
        return os.path.join(self.local_root, self.name)

    def stage_resources(self, stage: str) -> Resources:
        return self.resources.get(stage) or self.resources.get("pretrain") or Resources()


@dataclass
class RunSpec:
    """One run of a sweep: its name, id, folder and the overrides that compose its config."""

    name: str
    run_id: str
    run_dir: str
    overrides: list[str]
    axes: dict[str, Any]
    seed: int
    resolved: DinoConfig | None = field(default=None, repr=False, compare=False)
    """The composed config; None for a run read back from the sweep's manifest until asked for."""

    @property
    def label(self) -> str:
        return f"{self.name}-{self.run_id}"

    @property
    def config(self) -> DinoConfig:
        if self.resolved is None:
            from dino.config.compose_many import shared_composer

            self.resolved = shared_composer().compose(self.overrides)
        return self.resolved


SWEEP_KEYS = {f.name for f in dataclasses.fields(Sweep)} - {"path"}
RESOURCE_KEYS = {f.name for f in dataclasses.fields(Resources)}


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and validate a sweep file. `overrides` are `key=value` edits of the sweep file itself
    (e.g. `root=/tmp/x`, `array_parallelism=2`) or, for any other key, extra base overrides."""
    path = str(path)
    if not storage.exists(path):
        raise SweepError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as err:
        raise SweepError(yaml_error(path, err)) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    extra_base = []
    for ov in overrides:
        key, value = split_override(ov)
        if value is None:  # ~key: a base override for Hydra
            extra_base.append(ov)
        elif key.startswith("eval_overrides."):
            # eval_overrides.knn=[knn.max_train=5000]: appended to that stage's overrides.
            try:
                values = read_value(value) if value.startswith("[") else [value]
            except yaml.YAMLError:
                raise SweepError(
                    f"{path}: {ov}: not a list of overrides; quote items that hold brackets: {key}=['knn.k=[5]']"
                ) from None
            stages = raw["eval_overrides"] = raw.get("eval_overrides") or {}
            stage = key.split(".", 1)[1]
            stages[stage] = [*(stages.get(stage) or []), *values]  # a "[...]" value parses to a list
        elif key in SWEEP_KEYS and key not in ("base", "grid", "zip", "resources", "eval_overrides"):
            try:
                raw[key] = read_value(value)
            except yaml.YAMLError as err:
                raise SweepError(yaml_error(f"{path}: {ov}", err)) from None
        else:
            extra_base.append(ov)
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise SweepError(
            f"{path}: unknown key '{key}'{did_you_mean(key, SWEEP_KEYS)}; allowed: {', '.join(sorted(SWEEP_KEYS))}"
        )
    if "name" not in raw:
        raise SweepError(f"{path}: missing key 'name'")
    check_types(path, "", raw, Sweep)
    resources = {}
    for stage, res in (raw.pop("resources", None) or {}).items():
        if stage not in ("pretrain", *EVALS):
            raise SweepError(
                f"{path}: resources.{stage}: unknown stage{did_you_mean(stage, ['pretrain', *EVALS])}"
            )
        if not isinstance(res, dict | None):
            raise SweepError(f"{path}: resources.{stage}: {res!r} is not a mapping of scheduler parameters")
        bad = set(res or {}) - RESOURCE_KEYS
        if bad:
            key = sorted(bad)[0]
            raise SweepError(
                f"{path}: unknown key 'resources.{stage}.{key}'{did_you_mean(key, RESOURCE_KEYS)}"
            )
        check_types(path, f"resources.{stage}.", res or {}, Resources)
        resources[stage] = Resources(**(res or {}))
        check_gpus(path, stage, resources[stage])
    sweep = Sweep(path=path, resources=resources, **raw)
    sweep.root = expand_env(str(sweep.root), path, "root")  # root: /checkpoint/${USER:-me}/dinolab
    sweep.logs_root = os.path.expanduser(expand_env(str(sweep.logs_root or ""), path, "logs_root"))
    if storage.is_remote(sweep.logs_root):
        raise SweepError(
            f"{path}: logs_root: '{sweep.logs_root}' must be a shared filesystem path, not a URL"
        )
    sweep.tracking_uri = _tracking_uri(sweep)
    sweep.base = [*(sweep.base or []), *extra_base]
    sweep.grid, sweep.zip = sweep.grid or {}, sweep.zip or {}
    for stage in sweep.evals:
        if stage not in EVALS:
            raise SweepError(
                f"{path}: evals: unknown evaluation '{stage}'{did_you_mean(stage, EVALS)}; allowed: {', '.join(EVALS)}"
            )
    for stage, stage_overrides in sweep.eval_overrides.items():
        if stage not in EVALS:
            raise SweepError(
                f"{path}: eval_overrides.{stage}: unknown evaluation{did_you_mean(stage, EVALS)}"
            )
        if not isinstance(stage_overrides, list):
            raise SweepError(f"{path}: eval_overrides.{stage} must be a list of key=value overrides")
    lengths = {len(v) for v in sweep.zip.values()}
    if len(lengths) > 1:
        raise SweepError(f"{path}: every list under 'zip' must have the same length; got {sorted(lengths)}")
    for section in ("grid", "zip"):
        for key, values in getattr(sweep, section).items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path}: {section}.{key} must be a non-empty list of values")
    if not sweep.seeds:
        raise SweepError(f"{path}: seeds must list at least one seed")
    try:  # YAML reads 1e-6 (no dot) as a string
        budget = float(sweep.budget) if not isinstance(sweep.budget, bool) else -1.0
    except (TypeError, ValueError):
        budget = -1.0
    if budget < 0:
        raise SweepError(f"{path}: budget: '{sweep.budget}' must be GPU-hours (a number >= 0; 0 = no limit)")
    sweep.budget = budget
    return sweep


def _tracking_uri(sweep: Sweep) -> str:
    """The sweep's MLflow store: SQLite beside the runs unless the file names a server or "none"."""
    uri = str(sweep.tracking_uri or "none").strip()
    if uri.lower() == "none":
        return ""
    if uri == "default":
        # SQLite needs a POSIX filesystem: under an s3:// root the database stays in local_root
        # (artifacts still go to the root, see tracking_runs.artifact_location).
        return mlflow_store.sqlite_uri(sweep.local_root)
    if not uri.startswith(TRACKING_SCHEMES):
        raise SweepError(
            f"{sweep.path}: tracking_uri: '{uri}' is no MLflow store; use default (SQLite under root), "
            "none, sqlite:////abs/path/mlflow.db or http://host:port"
        )
    return uri


def _value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _short(key: str, sweep: Sweep) -> str:
    if key in sweep.short_names:
        return sweep.short_names[key]
    return key.split(".")[-1].split("=")[0]


def _grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    grid_keys = list(sweep.grid)
    zipped = [
        dict(zip(sweep.zip, values, strict=True)) for values in zip(*sweep.zip.values(), strict=True)
    ] or [{}]
    points = []
    for values in itertools.product(*(sweep.grid[k] for k in grid_keys)):
        for z in zipped:
            points.append({**dict(zip(grid_keys, values, strict=True)), **z})
    return points


def _check_axis_keys(sweep: Sweep) -> None:
    """Axes must name config keys or config groups; say which and the nearest valid one."""
    valid = set(flatten(to_dict(DinoConfig())))
    groups = {f.name for f in dataclasses.fields(DinoConfig)}
    for section in ("grid", "zip"):
        for key in getattr(sweep, section):
            if key not in valid and key not in groups:
                raise SweepError(
                    f"{sweep.path}: {section}.{key} names no config key{did_you_mean(key, valid)}"
                )


def expand(sweep: Sweep) -> list[RunSpec]:
    """Every (grid point, seed) as a RunSpec with its composed, validated config."""
    from dino.config.compose_many import ConfigComposer

    _check_axis_keys(sweep)
    composer = ConfigComposer()  # Hydra once per preset choice, not once per run
    runs: list[RunSpec] = []
    for point in _grid_points(sweep):
        for seed in sweep.seeds:
            parts = [f"{_short(k, sweep)}{_value(v)}" for k, v in point.items()]
            if len(sweep.seeds) > 1:
                parts.append(f"s{seed}")
            name = "-".join(parts) or "run"
            overrides = [*sweep.base, *(f"{k}={_value(v)}" for k, v in point.items()), f"train.seed={seed}"]
            exact = {"run.dir": "PLACEHOLDER"}
            if sweep.tracking_uri:  # the launcher creates the MLflow run; these name it for `train` alone
                overrides += [f"tracking.uri={sweep.tracking_uri}", f"tracking.experiment={sweep.name}"]
                exact["tracking.run_name"] = name
            try:
                # The run's name is set as is (unique to each run: not worth Hydra's parser); the job
                # composes the same value from the quoted override.
                cfg, run_id = composer.compose_with_id(overrides, exact)
                if sweep.tracking_uri:
                    overrides.append(f"tracking.run_name='{name}'")
            except ConfigError as err:
                raise SweepError(f"{sweep.path}: run {name}: {err}") from None
            run_dir = storage.join(sweep.folder, f"{name}-{run_id}")
            cfg.run.dir = run_dir
            runs.append(RunSpec(name, run_id, run_dir, [*overrides, f"run.dir={run_dir}"], point, seed, cfg))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(r for r in runs if ids.count(r.run_id) > 1)
        raise SweepError(
            f"{sweep.path}: two runs have the same config (id {dup.run_id}, e.g. {dup.name}); an axis changes nothing"
        )
    return runs


def select(runs: list[RunSpec], names: list[str] | None) -> list[RunSpec]:
    """Runs whose name, id or label is in `names` (all when `names` is empty)."""
    if not names:
        return runs
    chosen = [r for r in runs if r.name in names or r.run_id in names or r.label in names]
    missing = set(names) - {r.name for r in chosen} - {r.run_id for r in chosen} - {r.label for r in chosen}
    if missing:
        name = sorted(missing)[0]
        raise SweepError(f"no run named '{name}'{did_you_mean(name, [r.name for r in runs])}")
    return chosen
