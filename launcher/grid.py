"""A sweep's grid -> one `RunSpec` per grid point and seed, each with its composed, validated config.

Every run's config is composed here, once, by the composer of `dinolab train`
(dino/config/compose.py), so a typo in the base or an axis fails at `plan` with the file, the run, the
key and the nearest valid name; the job receives that config (`RunSpec.job_config`) and composes
nothing. A run's id is the hash of the config keys that can change its result
(dino/config/identity.py), so the same grid point always lands in the same folder:
`<root>/<sweep name>/<run name>-<id>/`, which is the config's run.dir.

A sweep's runs refuse to resume with code other than their checkpoint's (`train.on_code_change=refuse`,
unless the sweep file sets the key): one table, one code. The key is not part of the run id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import yaml

from dino.config.compose import Values, composer, job_dict, preset_groups
from dino.config.overrides import read_value
from dino.config.overrides import split as split_override
from dino.config.schema import ConfigError, DinoConfig, flatten, to_dict
from dino.config.suggest import did_you_mean
from dino.io import storage
from launcher.sweep_file import Sweep, SweepError


@dataclass
class RunSpec:
    """One run of a sweep: its name, id, folder and the overrides that compose its config (in that
    folder: run.dir is the folder, set by the planner, not an override)."""

    name: str
    run_id: str
    run_dir: str
    overrides: list[str]
    axes: dict[str, Any]
    seed: int
    resolved: DinoConfig | None = field(default=None, repr=False, compare=False)
    """The composed config; None for a run read back from the sweep's manifest until asked for."""
    _on_node: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """The values the job resolves on its node (`dino.config.compose.Values.on_node`)."""

    @property
    def label(self) -> str:
        return f"{self.name}-{self.run_id}"

    @property
    def config(self) -> DinoConfig:
        if self.resolved is None:
            self._compose(composer().values(self.overrides))
        return self.resolved

    def job_config(self) -> dict[str, Any]:
        """The config its `TrainJob` receives: a plain dict, `${oc.env:...}` values still expressions."""
        cfg = self.config  # composes a run read back from the manifest, and its _on_node
        return job_dict(cfg, self._on_node)

    def _compose(self, values: Values) -> None:
        """The config of `values` in this run's folder. run.dir is set here and only here; an
        expression the overrides gave it is dropped with the value (the planner chose the folder)."""
        self.resolved = composer().build({**values.flat, "run.dir": self.run_dir})
        self._on_node = {key: v for key, v in values.on_node.items() if key != "run.dir"}


def _value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _text(value: str) -> str:
    """`value` as override text that reads back as this string: quoted only where the parser would
    read something else (`0.5`, `true`, `[a`). A run's name is unique to it, so a quoted one would
    cost a YAML read per run (0.2 s of expanding 1,000 runs here)."""
    try:
        if read_value(value) == value:
            return value
    except yaml.YAMLError:
        pass
    return "'" + value.replace("'", "''") + "'"


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
    valid = set(flatten(to_dict(DinoConfig())))
    groups = set(preset_groups())
    for section in ("grid", "zip"):
        for key in getattr(sweep, section):
            if key not in valid and key not in groups:
                raise SweepError(
                    f"{sweep.path}: {section}.{key} names no config key{did_you_mean(key, valid)}"
                )


CODE_POLICY_KEY = "train.on_code_change"


def _code_policy(sweep: Sweep) -> list[str]:
    """`train.on_code_change=refuse` unless the sweep sets the key itself (base, an axis, or a
    `key=value` of the command line, which joins the base): a requeue or resubmit that would mix
    code versions in one table stops naming both code hashes (dino/run/state.py)."""
    keys = {split_override(ov)[0].lstrip("+") for ov in sweep.base} | set(sweep.grid) | set(sweep.zip)
    return [] if CODE_POLICY_KEY in keys else [f"{CODE_POLICY_KEY}=refuse"]


def expand(sweep: Sweep) -> list[RunSpec]:
    """Every (grid point, seed) as a RunSpec with its composed, validated config."""
    _check_axis_keys(sweep)
    runs: list[RunSpec] = []
    policy = _code_policy(sweep)
    for point in _grid_points(sweep):
        # What the point's seeds share, written once per point rather than once per run.
        point_parts = [f"{_short(k, sweep)}{_value(v)}" for k, v in point.items()]
        point_overrides = [*sweep.base, *(f"{k}={_value(v)}" for k, v in point.items())]
        for seed in sweep.seeds:
            parts = [*point_parts, f"s{seed}"] if len(sweep.seeds) > 1 else point_parts
            name = "-".join(parts) or "run"
            overrides = [*point_overrides, f"train.seed={seed}", *policy]
            if sweep.tracking_uri:  # the launcher creates the MLflow run; these name it for `train` alone
                overrides += [f"tracking.uri={sweep.tracking_uri}", f"tracking.experiment={sweep.name}",
                              f"tracking.run_name={_text(name)}"]  # fmt: skip
            try:
                values = composer().values(overrides)  # the folder comes from the id, run.dir from it
                run = RunSpec(name, values.run_id, storage.join(sweep.folder, f"{name}-{values.run_id}"),
                              overrides, point, seed)  # fmt: skip
                run._compose(values)
            except ConfigError as err:
                raise SweepError(f"{sweep.path}: run {name}: {err}") from None
            runs.append(run)
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
