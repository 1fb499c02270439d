"""A run's config: the schema, the chosen presets and `key=value` overrides -> a validated `DinoConfig`.

Overrides are read by the one parser of every command (dino/config/overrides.py). An override whose
key is a config group (`model=vit_test`, `data=fashion_mnist`) picks the preset file
`dino/conf/<group>/<name>.yaml`, and Hydra's compose API composes the schema with those presets
(`dino/conf/config.yaml` holds the defaults list); every other override is then merged into that,
in the order given (the last value of a key wins), with OmegaConf's type checks. Presets are applied
before values whatever the order on the command line, so `model.patch_size=8 model=vit_test` is ViT-test/8.

One `Composer` does this for `dinolab train` (`compose`) and for every run of a sweep alike. A sweep's
runs share their presets and differ in a few values, and OmegaConf takes 10-30 ms to merge a whole
config (Hydra 70-200 ms), so the composer keeps:
- the presets composed by Hydra once per distinct choice;
- each distinct `key=value` read by the one parser and type-checked (and converted: 1 -> 1.0 for a
  float key) by OmegaConf once;
and a config is then the preset base's flat dict updated with its values, built into the dataclasses
directly. What that cannot mirror exactly (an interpolation such as `${optim.lr}` or `${oc.env:RANK}`,
a key that is not a schema leaf, a value its type or YAML refuses, a preset that does not exist) goes
through OmegaConf itself (`overrides.apply` on the Hydra base), which also gives the error message.
`tests/unit/test_compose.py` checks both against OmegaConf.

A sweep's job gets its run's config composed here, as a plain dict (`job_dict`), and turns it back
into a `DinoConfig` on the node (`from_job_dict`); values that read the node's environment
(`${oc.env:RANK}`) travel as expressions and are resolved there.

Hydra and OmegaConf are imported inside the functions: commands that only read a sweep's files
(`sweep status`, `plan`) must not pay their import (tests/unit/test_layers.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import itertools
import operator
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from dino.config.identity import config_hash
from dino.config.overrides import apply, read_value, split, split_all
from dino.config.schema import ConfigError, DinoConfig, to_dict
from dino.config.suggest import not_allowed
from dino.config.validate import validate

_MISSING = object()


@functools.cache
def preset_groups() -> dict[str, tuple[str, ...]]:
    """{group: its preset names}: the folders of dino/conf and the YAML files in them."""
    root = importlib.resources.files("dino.conf")
    return {
        entry.name: tuple(
            sorted(f.name[: -len(".yaml")] for f in entry.iterdir() if f.name.endswith(".yaml"))
        )
        for entry in root.iterdir()
        if entry.is_dir() and not entry.name.startswith("_")
    }


def preset_file(group: str, name: str) -> Any:
    """The file of preset `name` of `group` (`dino/conf/data/fashion_mnist.yaml`); a name that is not
    there is refused naming the group, the nearest name and the choices (train and eval alike)."""
    problem = not_allowed(group, name, preset_groups()[group])
    if problem:
        raise ConfigError(problem)
    return importlib.resources.files("dino.conf") / group / f"{name}.yaml"


def preset_name(text: str) -> str:
    """The preset named by `text` as typed (`vit_test`, `'vit_test'`): a name, never a YAML value."""
    name = text.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        name = name[1:-1]
    return name


def _split_presets(overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({group: preset name}, [(key, value text)...]) of `overrides`; a preset that does not exist is
    refused naming the group, the nearest name and the choices."""
    groups = preset_groups()
    chosen: dict[str, str] = {}
    values = []
    for key, text in split_all(overrides):
        if key not in groups:
            values.append((key, text))
            continue
        name = preset_name(text)
        preset_file(key, name)  # exists, or one line naming the choices
        chosen[key] = name
    return chosen, values


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, type | None], ...]:
    """(name, dataclass type or None for a leaf) of each field: type hints resolved once per class."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
        for f in dataclasses.fields(cls)
    )


def _leaves(nested: dict[str, Any], cls: type = DinoConfig, prefix: str = "") -> dict[str, Any]:
    """{dotted schema leaf: value} of a nested config dict. Unlike `schema.flatten`, a mapping held by
    a leaf (`data.num_images={train: 5}`) stays one value."""
    flat = {}
    for name, child in _fields(cls):
        if child is not None:
            flat.update(_leaves(nested[name], child, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = nested[name]
    return flat


def _values_of(keys: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple]:
    """A function of a flat dict giving the values of `keys` as a tuple, in C when it can: an
    itemgetter of one key gives the value itself, not a 1-tuple."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    return lambda flat: tuple(flat[key] for key in keys)


@functools.cache
def _plan(cls: type, prefix: str = "") -> tuple:
    """How `_construct` builds `cls`, worked out once per class: (its field names when they must be
    passed by name (a keyword-only or init=False field), else None: by position, which costs a
    quarter of keywords; when every field is a leaf, one function giving all their values (a C
    itemgetter), else None; (dotted key, None for a leaf or (section class, its plan)) of each field)."""
    fields = _fields(cls)
    by_name = any(f.kw_only or not f.init for f in dataclasses.fields(cls))
    names = tuple(name for name, _ in fields) if by_name else None
    keys = tuple(f"{prefix}{name}" for name, _ in fields)
    if all(child is None for _, child in fields):
        return names, _values_of(keys), ()
    parts = tuple(
        (key, None if child is None else (child, _plan(child, key + ".")))
        for key, (_, child) in zip(keys, fields, strict=True)
    )
    return names, None, parts


_ATOMS = (str, int, float, bool, type(None))
_CONTAINERS = itertools.repeat((list, dict))
"""`map(isinstance, values, _CONTAINERS)`: which values are lists or mappings, without a Python-level
loop over a config's 80 leaves (a repeat iterator holds no state: one serves every call)."""


def _copied(value: list | dict) -> list | dict:
    """A list or mapping the caller may change without changing the composer's cached one: a
    shallow copy when it holds only immutable values (every list of the schema: 5x faster than
    `deepcopy`), else a deep one."""
    if type(value) is list and all(isinstance(v, _ATOMS) for v in value):
        return list(value)
    if type(value) is dict and all(isinstance(v, _ATOMS) for v in value.values()):
        return dict(value)
    return copy.deepcopy(value)


def _build(flat: dict[str, Any], cls: type = DinoConfig) -> Any:
    """The dataclass tree of `cls` from a flat {dotted leaf: value} dict. Lists and mappings are
    copied: the composer's caches hand the same value to every run that has it."""
    lists = itertools.compress(flat, map(isinstance, flat.values(), _CONTAINERS))
    copies = {key: _copied(flat[key]) for key in lists}
    return _construct({**flat, **copies} if copies else flat, cls, _plan(cls))


def _construct(flat: dict[str, Any], cls: type, plan: tuple) -> Any:
    names, values, parts = plan
    if values is not None:
        args = values(flat)
    else:
        args = [flat[key] if section is None else _construct(flat, *section) for key, section in parts]
    return cls(*args) if names is None else cls(**dict(zip(names, args, strict=True)))


def _holds(value: Any, text: str) -> bool:
    """Whether `text` is in a string of `value` (a string, or one inside a list or mapping)."""
    if isinstance(value, str):
        return text in value
    if isinstance(value, list | dict):
        return any(_holds(v, text) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _escaped(value: Any) -> Any:
    """`value` with every `${` of its strings escaped, so that OmegaConf reads it as text again."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Values:
    """A config composed but not yet built: what the planner needs before it knows the run's folder."""

    flat: dict[str, Any]
    """{dotted schema leaf: value}, every value resolved (here, in this process's environment)."""
    run_id: str
    """`config_hash` of `flat` (run.dir is not part of it)."""
    on_node: dict[str, Any]
    """{leaf: expression} of the values to resolve where the run trains (`${oc.env:RANK}`); `job_dict`
    puts these in place of the resolved ones."""


class Composer:
    """Composes configs; its caches make the many configs of a sweep cost a dictionary copy each."""

    def __init__(self) -> None:
        self._groups = preset_groups()
        defaults = _leaves(to_dict(DinoConfig()))
        self._leaf_keys = frozenset(defaults)
        # Text keys: OmegaConf stores a string given to them as it is, so a value unique to each run
        # (`tracking.run_name`) costs no OmegaConf update.
        self._text_keys = frozenset(key for key, value in defaults.items() if isinstance(value, str))
        # override -> ("group", group, preset) or ("value", key, the value as stored), or None when it
        # needs OmegaConf itself: a sweep's runs repeat the same overrides, each is read once.
        self._resolved: dict[str, tuple[str, str, Any] | None] = {}
        self._converted: dict[tuple[str, str], Any] = {}  # (key, repr(value)) -> value as stored
        self._presets: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}  # Hydra's, nested
        self._bases: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}  # the same, flat, typed
        self._schema: Any = None  # OmegaConf's structured DinoConfig that `_convert` checks against

    def compose(self, overrides: list[str] | tuple[str, ...] = ()) -> DinoConfig:
        """The validated `DinoConfig` of `overrides`."""
        return self.build(self.values(overrides).flat)

    def values(self, overrides: list[str] | tuple[str, ...]) -> Values:
        """The composed values of `overrides` and their run id; errors name the key and the value."""
        flat = self._mirrored(overrides)
        if flat is not None:  # no interpolation on this path: nothing is left to the node
            return Values(flat, config_hash(flat), {})
        return self._through_omegaconf(overrides)

    def build(self, flat: dict[str, Any]) -> DinoConfig:
        """The validated `DinoConfig` of `Values.flat` (with whatever the caller set in it: run.dir)."""
        cfg = _build(flat)
        validate(cfg)
        return cfg

    # ---------------------------------------------------------------------------------------------
    def _through_omegaconf(self, overrides: list[str] | tuple[str, ...]) -> Values:
        chosen, pairs = _split_presets(overrides)
        base = self._preset_base(tuple(sorted(chosen.items())))
        flat = _leaves(to_dict(apply(DinoConfig, pairs, base)))
        on_node = _read_on_node(pairs, base) if any("${" in text for _, text in pairs) else {}
        return Values(flat, config_hash(flat), on_node)

    def _mirrored(self, overrides: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
        """The flat values from the caches, or None when an override needs OmegaConf itself."""
        chosen: dict[str, str] = {}
        values = []
        for override in overrides:
            resolved = self._resolved.get(override, _MISSING)
            if resolved is _MISSING:
                resolved = self._resolved[override] = self._resolve(override)
            if resolved is None:
                return None
            kind, key, value = resolved
            if kind == "group":
                chosen[key] = value
            else:
                values.append((key, value))
        flat = dict(self._base(tuple(sorted(chosen.items()))))
        flat.update(values)  # in order: the last value of a key wins
        return flat

    def _resolve(self, override: str) -> tuple[str, str, Any] | None:
        parsed = self._classify(override)
        if parsed is None or parsed[0] == "group":
            return parsed
        _, key, value = parsed
        converted = self._convert(key, value)
        return None if converted is _MISSING else ("value", key, converted)

    def _classify(self, override: str) -> tuple[str, str, Any] | None:
        key, text = split(override)
        if text is None or "${" in text or text.strip() == "???":
            # An interpolation is resolved against the whole config of its run, which only OmegaConf
            # has; `???` is OmegaConf's missing value, which its merge skips (the key keeps its value).
            return None
        if key in self._groups:
            name = preset_name(text)
            return ("group", key, name) if name in self._groups[key] else None
        if key not in self._leaf_keys:
            return None
        try:
            return ("value", key, read_value(text))
        except yaml.YAMLError:
            return None

    def _convert(self, key: str, value: Any) -> Any:
        """The value as the schema stores it (OmegaConf's validation and conversion, as `apply`
        applies an override), once per distinct (key, value); _MISSING when OmegaConf refuses it."""
        if key in self._text_keys and isinstance(value, str):
            return value
        cache_key = (key, repr(value))
        if cache_key not in self._converted:
            from omegaconf import OmegaConf
            from omegaconf.errors import OmegaConfBaseException

            if self._schema is None:
                self._schema = OmegaConf.structured(DinoConfig)
            try:
                # merge=False: a mapping value replaces the node (with merge, the node shared by every
                # value of this key would keep the keys an earlier value had).
                OmegaConf.update(self._schema, key, value, merge=False)
                node = OmegaConf.select(self._schema, key)
                converted = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
            except OmegaConfBaseException:
                converted = _MISSING
            self._converted[cache_key] = converted
        return self._converted[cache_key]

    def _base(self, choices: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        """The flat, typed values of the schema with the chosen presets."""
        if choices not in self._bases:
            self._bases[choices] = _leaves(to_dict(apply(DinoConfig, [], self._preset_base(choices))))
        return self._bases[choices]

    def _preset_base(self, choices: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        """The schema composed with the chosen presets by Hydra, as a plain dict."""
        if choices not in self._presets:
            self._presets[choices] = _hydra_compose(choices)
        return self._presets[choices]


def _read_on_node(pairs: list[tuple[str, str]], base: dict[str, Any]) -> dict[str, Any]:
    """The expressions of the values that read the environment (`${oc.env:...}`), as OmegaConf holds
    them before resolving: the job resolves them in its node's environment. When there is one, every
    interpolation stays an expression: one that refers to such a value (`${data.root}`) must be
    resolved on the node too, and the others resolve there to what they resolve to here."""
    from omegaconf import OmegaConf

    edits = OmegaConf.create()
    for key, text in pairs:  # as overrides.apply merges them (which has already accepted them)
        OmegaConf.update(edits, key, read_value(text))
    merged = OmegaConf.merge(OmegaConf.structured(DinoConfig), base, edits)
    raw = _leaves(OmegaConf.to_container(merged, resolve=False))
    expressions = {key: value for key, value in raw.items() if _holds(value, "${")}
    return expressions if any(_holds(v, "${oc.env:") for v in expressions.values()) else {}


def _hydra_compose(choices: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The schema composed with the chosen presets by Hydra's compose API, unresolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # The schema is the first entry of the defaults list: Hydra type-checks each preset against it.
    ConfigStore.instance().store(name="dino_schema", node=DinoConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dino.conf", version_base="1.3"):
            composed = hydra_compose(config_name="config", overrides=[f"{g}={n}" for g, n in choices])
        return OmegaConf.to_container(composed, resolve=False)
    except (HydraException, OmegaConfBaseException) as err:  # a preset file that does not fit the schema
        raise ConfigError(" ".join(str(err).split())) from None
    finally:
        GlobalHydra.instance().clear()


@functools.cache
def composer() -> Composer:
    """The process's composer: its caches serve `dinolab train`, every sweep and the runs read back
    from a sweep's manifest."""
    return Composer()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DinoConfig:
    """The validated `DinoConfig` of `overrides`."""
    return composer().compose(overrides)


def job_dict(cfg: DinoConfig, on_node: dict[str, Any]) -> dict[str, Any]:
    """What a job receives of its run's config: `to_dict(cfg)` (small, picklable), with the values
    `on_node` (`Values.on_node`) as their expressions. The node reads it with OmegaConf, so a `${`
    that a resolved string holds (an escaped `\\${x}` gave `${x}`) is escaped again to stay text."""
    data = to_dict(cfg)
    for key, value in _leaves(data).items():
        if key in on_node:
            value = on_node[key]
        elif _holds(value, "${"):
            value = _escaped(value)
        else:
            continue
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[name] = value
    return data


def from_job_dict(data: dict[str, Any]) -> DinoConfig:
    """The validated `DinoConfig` of a `job_dict`, its expressions resolved here (OmegaConf, no Hydra)."""
    cfg = apply(DinoConfig, [], data)
    validate(cfg)
    return cfg
