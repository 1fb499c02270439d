"""A sweep's grid -> one `RunSpec` per grid point and seed, each with its composed, validated config.

Every run's config is composed like `dinolab train` composes it (dino/config/compose_many.py, checked
equal to dino/config/compose.py), so a typo in the base or an axis fails at `plan` with the file, the
run, the key and the nearest valid name. A run's id is the hash of the config keys that can change its
result (dino/config/identity.py), so the same grid point always lands in the same folder:
`<root>/<sweep name>/<run name>-<id>/`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from dino.config.schema import ConfigError, DinoConfig, flatten, to_dict
from dino.config.suggest import did_you_mean
from dino.io import storage
from launcher.sweep import Sweep
from launcher.sweep_checks import SweepError


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
    """Axes must name config keys or preset groups (`model`, `data`); say which and the nearest valid one."""
    from dino.config.compose import preset_groups

    valid = set(flatten(to_dict(DinoConfig())))
    groups = set(preset_groups())
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
    composer = ConfigComposer()  # the presets once per choice, each distinct value once
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
                # The run's name is set as is (unique to each run: not worth parsing); the job composes
                # the same value from the quoted override.
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
