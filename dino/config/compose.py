"""Hydra composition of a run's config: `dino/conf/config.yaml`, its presets and `key=value` overrides
-> a validated `DinoConfig`, and Hydra's and OmegaConf's errors turned into one line naming the key.

Hydra and OmegaConf are imported inside the functions: commands that only read a sweep's files
(`sweep status`, `plan`) must not pay their import (tests/unit/test_layers.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any

from dino.config.schema import ConfigError, DinoConfig, flatten, to_dict
from dino.config.suggest import unknown_key
from dino.config.types import type_name as schema_type_name
from dino.config.types import type_words
from dino.config.validate import validate


def register_configs() -> None:
    """Register the schema so YAML presets and overrides are type-checked against it."""
    # Hydra is imported here, not at the top: commands that only read a sweep's files (status)
    # should not pay its import.
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dino_schema", node=DinoConfig)


def compose(overrides: list[str] | tuple[str, ...] = (), check: bool = True) -> DinoConfig:
    """Compose `dino/conf/config.yaml` with Hydra overrides and return a validated `DinoConfig`
    (`check=False`: not validated, for a preset that later overrides complete)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dino.conf", version_base="1.3"):
            dict_cfg = hydra_compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(dict_cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain_compose_error(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    if check:
        validate(cfg)
    return cfg


def _explain_compose_error(err: Exception, overrides: list[str] | tuple[str, ...]) -> str:
    """Turn Hydra/OmegaConf errors into one line naming the key and the nearest valid name."""
    from omegaconf.errors import OmegaConfBaseException, ValidationError

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__  # Hydra's "Error merging override" wraps OmegaConf's reason
    if cause is not None and cause.full_key:
        return _explain_type_error(cause, overrides)
    msg = str(err).strip().splitlines()[0]
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if "=" not in ov:
            continue
        if "." not in key and key in {f.name for f in dataclasses.fields(DinoConfig)}:
            continue  # a config group choice; Hydra's own message lists the options
        valid = flatten(to_dict(DinoConfig()))
        if key not in valid and "." in key:
            return unknown_key(key, valid)
    if isinstance(err, OmegaConfBaseException) and err.full_key and err.msg:
        return f"{err.full_key}: {err.msg.strip().splitlines()[0]}"  # without reference_type=... lines
    full = str(err).strip().replace("\n", " ")
    return full if len(full) < 400 else msg


def _schema_field(key: str) -> tuple[Any, Any] | None:
    """(type, default) of a dotted schema key, e.g. (int, 64) for optim.batch_size."""
    *parents, name = key.split(".")
    node: Any = DinoConfig()
    for part in parents:
        node = getattr(node, part, None)
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
        return None
    hint = typing.get_type_hints(type(node))[name]
    return hint, getattr(node, name)


def _explain_type_error(cause: Any, overrides: list[str] | tuple[str, ...]) -> str:
    """`optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64`: the key,
    the value as given, the reason and the expected type (OmegaConf's text only when the key is not
    a schema field)."""
    key = re.sub(r"(\[\d+\])+$", "", str(cause.full_key))  # crops.global_scale[0] -> crops.global_scale
    given = [ov.split("=", 1)[1] for ov in overrides if "=" in ov and ov.split("=", 1)[0].lstrip("+~") == key]
    value = given[-1] if given else cause.value
    schema = _schema_field(key)
    if schema is None:
        return f"{key}={value!r}: {(cause.msg or str(cause)).strip().splitlines()[0]}"
    hint, default = schema
    words, type_name = type_words(hint), schema_type_name(hint)
    example = json.dumps(list(default) if isinstance(default, tuple) else default).replace(" ", "").strip('"')
    hint = f", e.g. {key}={example}" if example else ""
    return f"{key}={value!r} is not {words}; expected {type_name}{hint}"
