"""A run's config: the schema, the chosen presets and `key=value` overrides -> a validated `DinoConfig`.

Overrides are read by the one parser of every command (dino/config/overrides.py). An override whose
key is a config group (`model=vit_test`, `data=fashion_mnist`) picks the preset file
`dino/conf/<group>/<name>.yaml`, and Hydra's compose API composes the schema with those presets
(`dino/conf/config.yaml` holds the defaults list); every other override is then merged into that,
in the order given (the last value of a key wins), with OmegaConf's type checks. Presets are applied
before values whatever the order on the command line, so `model.patch_size=8 model=vit_test` is ViT-test/8.

Hydra and OmegaConf are imported inside the functions: commands that only read a sweep's files
(`sweep status`, `plan`) must not pay their import (tests/unit/test_layers.py).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from typing import Any

from dino.config.overrides import apply, split_all
from dino.config.schema import ConfigError, DinoConfig
from dino.config.suggest import not_allowed
from dino.config.validate import validate


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


def split_presets(overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, str], list[tuple[str, str]]]:
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
def _preset_base(choices: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The schema composed with the chosen presets by Hydra (once per distinct choice)."""
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


def preset_base(chosen: dict[str, str]) -> dict[str, Any]:
    """The config as a plain dict with `chosen` presets and no other override (a copy of its own)."""
    return copy.deepcopy(_preset_base(tuple(sorted(chosen.items()))))


def compose(overrides: list[str] | tuple[str, ...] = (), check: bool = True) -> DinoConfig:
    """The validated `DinoConfig` of `overrides` (`check=False`: not validated, for a preset that
    later overrides complete)."""
    chosen, values = split_presets(overrides)
    cfg = apply(DinoConfig, values, preset_base(chosen))
    if check:
        validate(cfg)
    return cfg
