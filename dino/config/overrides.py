"""`key=value` overrides: one syntax and one parser for train, a sweep's base and axes, eval, viz and
sweep-file edits.

An override splits at its first `=`; the value is read as YAML the way OmegaConf reads a dotlist
(`1e-3` is a number, `[10,20]` a list, dates stay text), so `optim.lr=1e-3`, `knn.k=[10,20]`,
`budget=0.5` and `eval_overrides.knn=[knn.max_train=5000]` mean the same wherever they are written.
`apply` merges them into a schema dataclass with OmegaConf's type checks (and its `${oc.env:RANK}`
interpolation); a wrong key or type is one line naming the key, the value and what was expected.
`dinolab train` picks presets with the same syntax (`model=vit_test`): dino/config/compose.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from typing import Any

import yaml

from dino.config.schema import ConfigError, flatten, to_dict
from dino.config.suggest import unknown_key
from dino.config.types import type_name, type_words

# Scalars are read as Hydra's override grammar read `dinolab train`'s values before: true/false,
# null, decimal integers (010 is 10), numbers with or without a dot (1e-3, as OmegaConf reads them);
# anything else is text as typed. YAML 1.1's other scalars (yes/no/on/off, octal, hex, 12:30, dates)
# stay text, so a string key gets what was typed and an integer key never reads 010 as octal 8.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:null|Null|NULL|~)$")
_INT = re.compile(r"^[-+]?[0-9][0-9_]*$")
_FLOAT = re.compile(
    r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_SCALARS = (
    ("bool", _BOOL, list("tTfF")),
    ("null", _NULL, list("nN~")),
    ("int", _INT, list("-+0123456789")),
    ("float", _FLOAT, list("-+0123456789.")),
)


@functools.cache
def _loader() -> type:
    class ValueLoader(yaml.SafeLoader):
        """SafeLoader for the items of a list or mapping value, with the scalar rules above."""

    ValueLoader.yaml_implicit_resolvers = {}
    for tag, pattern, first in _SCALARS:
        ValueLoader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", pattern, first)
    ValueLoader.add_constructor(  # decimal, always: YAML 1.1 reads 010 as octal
        "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node).replace("_", ""))
    )
    return ValueLoader


def read_value(text: str) -> Any:
    """The value of `key=<text>`: `[1,2]` a list, `{a: 1}` a mapping, `'a b'` a quoted string,
    `0.5`/`1e-3`/`3` numbers, `true` a bool, `null` None, empty text the empty string, and anything
    else the text as typed (`s3://b/k=v`, `${oc.env:RANK}`, `yes`). Raises yaml.YAMLError for a list,
    mapping or quote YAML cannot read (`[a`)."""
    text = text.strip()
    if not text:
        return ""
    if text[0] in "[{'\"":
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    if any(pattern.match(text) for _, pattern, _ in _SCALARS):
        return yaml.load(text, Loader=_loader())  # noqa: S506 - the same scalar rules as in lists
    return text


def _read(key: str, text: str) -> Any:
    try:
        return read_value(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{key}={text!r} is not a value YAML can read: {problem}") from None


def split(override: str) -> tuple[str, str | None]:
    """`key=value` -> (key, value text); (override, None) when it has no `=`."""
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
    """`schema` dataclass <- `base` dict <- dotted `pairs`, in order (the last value of a key wins),
    type-checked and converted by OmegaConf. An unknown key names the nearest valid one; a wrong type
    names the key, the value as given and the expected type."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException, ValidationError

    valid = flatten(to_dict(schema()))
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
    except ValidationError as err:
        if err.full_key:
            raise ConfigError(_wrong_type(schema, err, pairs)) from None
        raise ConfigError(_first_line(err)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(f"{key}: {_first_line(err)}" if key else _first_line(err)) from None


def _first_line(err: Exception) -> str:
    return str(getattr(err, "msg", "") or err).strip().splitlines()[0]


def _field(schema: type, key: str) -> tuple[Any, Any] | None:
    """(type, default) of a dotted key of `schema`, e.g. (int, 64) for optim.batch_size."""
    *parents, name = key.split(".")
    node: Any = schema()
    for part in parents:
        node = getattr(node, part, None)
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
        return None
    return typing.get_type_hints(type(node))[name], getattr(node, name)


def _wrong_type(schema: type, err: Any, pairs: list[tuple[str, str]]) -> str:
    """`optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64`: the key,
    the value as given, the reason and the expected type (OmegaConf's text when the key is not a
    field of `schema`). OmegaConf's own line ("Value 'abc' of type 'str' could not be converted to
    Integer") names neither the key as typed nor an example."""
    key = re.sub(r"(\[\d+\])+$", "", str(err.full_key))  # crops.global_scale[0] -> crops.global_scale
    given = [text for k, text in pairs if k == key]
    value = given[-1] if given else err.value
    found = _field(schema, key)
    if found is None:
        return f"{key}={value!r}: {_first_line(err)}"
    hint, default = found
    example = json.dumps(list(default) if isinstance(default, tuple) else default).replace(" ", "").strip('"')
    example = f", e.g. {key}={example}" if example else ""
    return f"{key}={value!r} is not {type_words(hint)}; expected {type_name(hint)}{example}"
