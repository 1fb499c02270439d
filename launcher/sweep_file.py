"""A sweep file (`sweeps/*.yaml`) -> a validated `Sweep`: its runs' base overrides and axes, resources,
evaluations, store and budget (launcher/grid.py expands it into runs).

Every key of the file is checked against the typed `Sweep`/`Resources` (the checks at the end of this module: values against the schema's types, one task per GPU, a
YAML error as one line, environment variables in paths), so a
typo or a wrong type fails at `plan` naming the file, the key, the value and the nearest valid name.
`key=value` edits on the command line (`root=/tmp/x`, `eval_overrides.knn=[knn.max_train=5000]`) are
read by the same parser as every other override (dino/config/overrides.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dino.config.overrides import read_value
from dino.config.overrides import split as split_override
from dino.config.schema import TRACKING_SCHEMES
from dino.config.suggest import did_you_mean
from dino.config.types import fits, type_name, type_words
from dino.io import mlflow_store, storage


# ---- the checks of a sweep file that need no sweep ---------------------------------------------------
class SweepError(ValueError):
    """A sweep file that cannot work; the message names the file and the key."""


# Keys whose empty value (`base:` with nothing under it) means their default.
MAY_BE_EMPTY = {"base", "grid", "zip", "resources", "logs_root", "tracking_uri"}


def check_types(path: str, where: str, values: dict[str, Any], schema: type) -> None:
    """Every value of a sweep file's section against the type of its field in `schema` (Sweep or
    Resources): a wrong one names the file, the key, the value and the type it must have."""
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        hint = Any if key == "budget" else hints[key]  # budget: its own check (1e-6 is text in YAML)
        if value is None and key in MAY_BE_EMPTY:
            continue
        if not fits(value, hint):
            raise SweepError(
                f"{path}: {where}{key}: {value!r} is not {type_words(hint)}; expected {type_name(hint)}"
            )


def check_gpus(path: str, stage: str, res: Any) -> None:
    """One task per GPU: each rank takes cuda:LOCAL_RANK (dino/io/distributed.py), so a node's tasks
    beyond its GPUs would have none (found here, not hours later in the queue)."""
    if res.gpus_per_node and res.tasks_per_node > res.gpus_per_node:
        raise SweepError(
            f"{path}: resources.{stage}: tasks_per_node={res.tasks_per_node} > gpus_per_node={res.gpus_per_node}: "
            "dinolab runs one task per GPU; set tasks_per_node to the GPUs per node"
        )


def yaml_error(path: str, err: yaml.YAMLError) -> str:
    """One line: `file: line L, column C: not valid YAML: <the parser's problem> (while ...)`."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    if mark is None or not problem:
        return f"{path}: not valid YAML: {' '.join(str(err).split())}"
    text = f"{path}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"
    context, where = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context != problem:
        text += f" ({context}" + (f" at line {where.line + 1}, column {where.column + 1})" if where else ")")
    return text


# $NAME, ${NAME} or ${NAME:-default}; the default is used when NAME is unset or empty, as in a shell.
_ENV_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?::-(?P<default>[^${}]*))?\}|(?P<bare>[A-Za-z_]\w*))")


def expand_env(value: str, path: str, key: str) -> str:
    """Expand environment variables in a sweep file's path value (`root`, `logs_root`). Unlike
    os.path.expandvars an unset variable without a default is an error, not a literal `${USER}`
    that would end up in folder names (and in OmegaConf's interpolation of tracking.uri)."""

    def replace(match: re.Match[str]) -> str:
        name, default = match["braced"] or match["bare"], match["default"]
        current = os.environ.get(name)
        if default is not None:
            return current or default
        if current is None:
            raise SweepError(
                f"{path}: {key}: environment variable {name} is not set; "
                f"set it or give a default: ${{{name}:-name}}"
            )
        return current

    expanded = _ENV_VAR.sub(replace, value)
    if "${" in expanded:
        raise SweepError(
            f"{path}: {key}: cannot expand '{value}'; write environment variables as $NAME, ${{NAME}} "
            "or ${NAME:-default}"
        )
    return expanded


# ---- the sweep --------------------------------------------------------------------------------------

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


STRATEGIES = ("grid", "halving")
SEARCH_STAGE = "search"  # the resources of a halving search's decision jobs (`resources: search:`)
MODES = ("max", "min")


@dataclass
class Search:
    """How the grid is searched (`search:` in the sweep file): `grid` trains every run to the end;
    `halving` is synchronous successive halving (launcher/halving.py): every run trains to the first
    rung, the best 1/keep of the cells go on to the next, the rest are pruned."""

    strategy: str = "grid"
    metric: str = "monitor_knn_top1"
    """The metric the rungs decide on: one the runs log (the k-NN monitor runs at every rung)."""
    mode: str = "max"
    """max: higher is better; min: lower is."""
    rungs: list[float] = field(default_factory=lambda: [0.2, 1.0])
    """Fractions of each run's schedule at which to decide, increasing, the last 1.0."""
    keep: int = 3
    """η: the best ceil(cells / keep) cells of a rung go on."""

    @property
    def halving(self) -> bool:
        return self.strategy == "halving"


SEARCH_KEYS = {f.name for f in dataclasses.fields(Search)}


def _read_search(raw: Any, path: str) -> Search:
    """The `search:` block, checked: unknown keys, types, choices, the rungs and keep."""
    if raw is None:
        return Search()
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: search must be a mapping (strategy, metric, mode, rungs, keep)")
    unknown = set(raw) - SEARCH_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise SweepError(
            f"{path}: unknown key 'search.{key}'{did_you_mean(key, SEARCH_KEYS)}; allowed: {', '.join(sorted(SEARCH_KEYS))}"
        )
    check_types(path, "search.", raw, Search)
    search = Search(**raw)
    for key, value, allowed in (("strategy", search.strategy, STRATEGIES), ("mode", search.mode, MODES)):
        if value not in allowed:
            raise SweepError(
                f"{path}: search.{key}: '{value}'{did_you_mean(str(value), allowed)}; allowed: {', '.join(allowed)}"
            )
    rungs = [float(r) for r in search.rungs]
    if not rungs or rungs[-1] != 1.0 or any(not 0 < r <= 1 for r in rungs) or rungs != sorted(set(rungs)):
        raise SweepError(
            f"{path}: search.rungs: {search.rungs} must be increasing fractions of the schedule in (0, 1], "
            "the last 1.0 (e.g. [0.2, 1.0])"
        )
    search.rungs = rungs
    if search.keep < 2:
        raise SweepError(f"{path}: search.keep: {search.keep} must be at least 2 (keep the best 1/keep)")
    if not search.metric:
        raise SweepError(f"{path}: search.metric must name a metric the runs log (e.g. monitor_knn_top1)")
    return search


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
    """GPU-hours a submission may cost at most (its estimate, launcher/cost/sweep_cost.py); 0 = no limit."""
    baseline: dict[str, Any] = field(default_factory=dict)
    """The report's reference cell, {axis: value} (`dinolab report --vs` by default): every other cell is
    compared with it. Axes of `grid`/`zip` only, each value one of that axis's."""
    search: Search = field(default_factory=Search)
    """`grid` (every run to the end) or successive `halving` over the grid (launcher/halving.py)."""
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
        if stage == SEARCH_STAGE and SEARCH_STAGE not in self.resources:
            # A rung's decision: reads records, ranks, submits; one CPU beside the pretraining's
            # partition, account and setup, no GPU.
            return dataclasses.replace(self.stage_resources("pretrain"), nodes=1, gpus_per_node=0, tasks_per_node=1,
                                       cpus_per_task=1, mem_gb=2)  # fmt: skip
        return self.resources.get(stage) or self.resources.get("pretrain") or Resources()


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
    extra_base = _apply_edits(raw, overrides, path)
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise SweepError(
            f"{path}: unknown key '{key}'{did_you_mean(key, SWEEP_KEYS)}; allowed: {', '.join(sorted(SWEEP_KEYS))}"
        )
    if "name" not in raw:
        raise SweepError(f"{path}: missing key 'name'")
    search = _read_search(raw.pop("search", None), path)  # a section of its own, checked there
    check_types(path, "", raw, Sweep)
    resources = _read_resources(raw.pop("resources", None) or {}, path)
    sweep = Sweep(path=path, resources=resources, search=search, **raw)
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
    _check_baseline(sweep)
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


def _check_baseline(sweep: Sweep) -> None:
    """`baseline:` names axes of the sweep and values they take."""
    axes = {**sweep.grid, **sweep.zip}
    for axis, value in sweep.baseline.items():
        if axis not in axes:
            raise SweepError(
                f"{sweep.path}: baseline.{axis}: not an axis of the sweep{did_you_mean(axis, list(axes))}; "
                f"axes: {', '.join(axes) or 'none'}"
            )
        if not any(v == value or str(v) == str(value) for v in axes[axis]):
            raise SweepError(
                f"{sweep.path}: baseline.{axis}: {value!r} is not one of its values "
                f"({', '.join(map(str, axes[axis]))})"
            )


def _apply_edits(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], path: str) -> list[str]:
    """Apply the command line's `key=value` edits of sweep-file keys to `raw` (in place); return the
    other overrides, which are extra base overrides of every run."""
    extra_base = []
    for ov in overrides:
        key, value = split_override(ov)
        if value is None:
            raise SweepError(f"{path}: override {ov!r} must look like key=value (e.g. root=/tmp/x)")
        if key.startswith("eval_overrides."):
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
        elif key.startswith("search.") and key.split(".", 1)[1] in SEARCH_KEYS:  # search.keep=2
            try:
                raw.setdefault("search", {})[key.split(".", 1)[1]] = read_value(value)
            except yaml.YAMLError as err:
                raise SweepError(yaml_error(f"{path}: {ov}", err)) from None
        elif key in SWEEP_KEYS and key not in (
            "base",
            "grid",
            "zip",
            "resources",
            "eval_overrides",
            "search",
        ):
            try:
                raw[key] = read_value(value)
            except yaml.YAMLError as err:
                raise SweepError(yaml_error(f"{path}: {ov}", err)) from None
        else:
            extra_base.append(ov)
    return extra_base


def _read_resources(raw: dict[str, Any], path: str) -> dict[str, Resources]:
    """The `resources:` mapping as {stage: Resources}, every key and value checked."""
    resources = {}
    for stage, res in raw.items():
        if stage not in ("pretrain", *EVALS, SEARCH_STAGE):
            raise SweepError(
                f"{path}: resources.{stage}: unknown stage{did_you_mean(stage, ['pretrain', *EVALS, SEARCH_STAGE])}"
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
    return resources


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
