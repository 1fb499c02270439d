"""Compose many configs that differ in a few values: a sweep's runs, at a dictionary copy's cost each.

`compose()` builds an OmegaConf tree of the whole schema and merges into it (10-30 ms on our 2-core
machine; Hydra's compose per run took 70-200 ms), so `sweep plan`/`status` of a 1,000-run grid would
spend most of their time composing. The runs of a sweep share their presets (`model=vit_test`,
`data=fashion_mnist`) and differ in a few values, so:
- the presets are composed once per distinct choice (`dino.config.compose.preset_base`);
- each distinct `key=value` override is read by the one parser (dino/config/overrides.py) and
  type-checked (and converted: 1 -> 1.0 for a float key) by OmegaConf against the schema once;
- a run's config is then the preset base's flat dict updated with its values, built into the
  dataclasses directly and validated like `compose()` does.
Anything this cannot mirror exactly (a key that is not a schema leaf, a value that fails its type
check or YAML cannot read) goes through `dino.config.compose.compose` itself, which also gives the
error message. `tests/unit/test_compose_many.py` checks that both give the same config and run id.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

import yaml

from dino.config.compose import compose, preset_groups
from dino.config.identity import config_hash
from dino.config.overrides import read_value, split
from dino.config.schema import DinoConfig, flatten, to_dict
from dino.config.validate import validate

_MISSING = object()


def _schema_leaves() -> set[str]:
    """Every schema leaf as a dotted key (optim.lr): what a value override may set."""
    return set(flatten(to_dict(DinoConfig())))


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, type | None], ...]:
    """(name, dataclass type or None for a leaf) of each field: type hints resolved once per class."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
        for f in dataclasses.fields(cls)
    )


def build(flat: dict[str, Any], cls: type = DinoConfig, prefix: str = "") -> Any:
    """The dataclass tree of `cls` from a flat {dotted key: value} dict (lists copied: no sharing
    between runs)."""
    kwargs = {}
    for name, child in _fields(cls):
        key = f"{prefix}{name}"
        if child is not None:
            kwargs[name] = build(flat, child, key + ".")
        else:
            value = flat[key]
            kwargs[name] = list(value) if isinstance(value, list) else value
    return cls(**kwargs)


class ConfigComposer:
    """`compose(overrides)` for many override lists, equal to `dino.config.compose.compose(overrides)`."""

    def __init__(self) -> None:
        self._groups = set(preset_groups())
        self._leaves = _schema_leaves()
        self._parsed: dict[str, tuple[str, str, Any] | None] = {}
        self._bases: dict[tuple[str, ...], dict[str, Any]] = {}
        self._values: dict[tuple[str, str], Any] = {}
        self._schema = None

    def compose(self, overrides: list[str], exact: dict[str, Any] | None = None) -> DinoConfig:
        """The config of `overrides`, then the schema leaves in `exact` set to these values as they
        are (values unique to each run, such as its folder, not worth parsing)."""
        return self.compose_with_id(overrides, exact)[0]

    def compose_with_id(
        self, overrides: list[str], exact: dict[str, Any] | None = None
    ) -> tuple[DinoConfig, str]:
        """The config and its run id (`config_hash`, here of the flat values it was built from:
        dataclasses.asdict of 1,000 configs took a second)."""
        flat = self._flat(overrides)
        if flat is None:  # not mirrored: compose() itself (and its error message)
            cfg = compose(overrides)
            for key, value in (exact or {}).items():
                *parents, name = key.split(".")
                node = cfg
                for part in parents:
                    node = getattr(node, part)
                setattr(node, name, value)
            return cfg, config_hash(cfg)
        flat.update(exact or {})
        cfg = build(flat)
        validate(cfg)
        return cfg, config_hash(flat)

    # ---------------------------------------------------------------------------------------------
    def _flat(self, overrides: list[str]) -> dict[str, Any] | None:
        groups, values = [], []
        for override in overrides:
            parsed = self._parse(override)
            if parsed is None:
                return None
            kind, key, value = parsed
            (groups if kind == "group" else values).append((override, key, value))
        base_key = tuple(override for override, _, _ in groups)
        if base_key not in self._bases:
            self._bases[base_key] = flatten(to_dict(compose(list(base_key), check=False)))  # checks the names
        flat = dict(self._bases[base_key])
        for _, key, value in values:
            converted = self._convert(key, value)
            if converted is _MISSING:
                return None
            flat[key] = converted
        return flat

    def _parse(self, override: str) -> tuple[str, str, Any] | None:
        if override not in self._parsed:
            self._parsed[override] = self._classify(override)
        return self._parsed[override]

    def _classify(self, override: str) -> tuple[str, str, Any] | None:
        key, text = split(override)
        if text is None or "${" in text:
            # An interpolation is resolved against the whole config of its run, which only compose() has.
            return None
        if key in self._groups:
            return ("group", key, text)
        if key not in self._leaves:
            return None
        try:
            return ("value", key, read_value(text))
        except yaml.YAMLError:
            return None

    def _convert(self, key: str, value: Any) -> Any:
        """The value as the schema stores it (OmegaConf's validation and conversion, as `compose()`
        applies an override), once per distinct (key, value)."""
        cache_key = (key, repr(value))
        if cache_key not in self._values:
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
            self._values[cache_key] = converted
        return self._values[cache_key]


@functools.cache
def shared_composer() -> ConfigComposer:
    """One composer per process, for configs composed one at a time (runs read from a manifest)."""
    return ConfigComposer()
