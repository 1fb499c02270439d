"""`key=value` overrides of eval, viz and sweep files: one syntax, one parser, one value reader.

`dinolab train` (and the sweep runs it composes) hand their overrides to Hydra's override grammar
(dino/config/compose.py, dino/config/compose_many.py), which also knows `+key`, `~key` and group choices.
Everything else splits at the first `=` here, and reads the value as YAML the way OmegaConf reads a
dotlist (`1e-3` is a number, dates stay text), so `knn.k=[10,20]`, `linear.lr=1e-3`, `budget=0.5`
and `eval_overrides.knn=[knn.max_train=5000]` mean the same wherever they are written.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import yaml

from dino.config.schema import ConfigError, flatten
from dino.config.suggest import unknown_key

# YAML 1.1 misses floats without a dot (1e-3); OmegaConf's loader adds them, and so does this one.
_FLOAT = re.compile(
    r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


@functools.cache
def _loader() -> type:
    class ValueLoader(yaml.SafeLoader):
        """SafeLoader with OmegaConf's float rule and without timestamps (a date stays text)."""

    ValueLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    ValueLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return ValueLoader


def read_value(text: str) -> Any:
    """The value of `key=<text>`: `[1,2]` a list, `0.5` and `1e-3` numbers, `true` a bool, `''` and
    text strings. Raises yaml.YAMLError for text YAML cannot read (`[a`)."""
    return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass


def _read(key: str, text: str) -> Any:
    try:
        return read_value(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{key}={text!r} is not a value YAML can read: {problem}") from None


def split(override: str) -> tuple[str, str | None]:
    """`key=value` -> (key, value text); (override, None) when it has no `=` (Hydra's `~key`)."""
    key, sep, value = override.partition("=")
    return (key.strip(), value) if sep else (override, None)


def split_all(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Every override as (key, value text); one without `=` is refused naming the expected form."""
    pairs = []
    for ov in overrides:
        key, value = split(ov)
        if value is None:
            raise ConfigError(f"override {ov!r} must look like key=value (e.g. run.dir=runs/a)")
        pairs.append((key, value))
    return pairs


def apply(schema: type, pairs: list[tuple[str, str]], base: dict[str, Any] | None = None) -> Any:
    """`schema` dataclass <- `base` dict <- dotted `pairs`, type-checked by OmegaConf; an unknown key
    names the nearest valid one."""
    import dataclasses
    import json

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    valid = flatten(json.loads(json.dumps(dataclasses.asdict(schema()))))
    groups = {k.split(".")[0] for k in valid if "." in k}
    for key, _ in pairs:
        if key not in valid and key not in groups:
            raise ConfigError(unknown_key(key, valid))
    try:
        merged = OmegaConf.structured(schema)
        if base:
            merged = OmegaConf.merge(merged, base)
        if pairs:
            edits = OmegaConf.create()
            for key, text in pairs:
                OmegaConf.update(edits, key, _read(key, text))  # as OmegaConf.from_dotlist does
            merged = OmegaConf.merge(merged, edits)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        msg = str(err).strip().splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
