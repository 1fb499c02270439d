"""Whether a value read from YAML or a command line fits a dataclass field's type, and how to say
what that type wants: shared by the run config's error messages and the sweep file's checks."""

from __future__ import annotations

import typing
from typing import Any

# What a value of a schema type must be, by the type's name as written in the dataclasses.
TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "tuple[float, float]": "a list of 2 numbers",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
}


def type_name(hint: Any) -> str:
    """`int`, `list[str]`, `tuple[float, float]`, `dict[str, typing.Any]`: the type as written."""
    return str(hint) if typing.get_origin(hint) else hint.__name__


def type_words(hint: Any) -> str:
    """`an integer`, `a mapping`: what a value of `hint` is, in words."""
    if typing.get_origin(hint) is dict:
        return "a mapping"
    name = type_name(hint)
    return TYPE_WORDS.get(name, f"of type {name}")


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML reads it) is of type `hint`: bool is no number, an integer is a
    float; for a mapping only that it is one (its values are checked where their meaning is known)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(fits(v, item) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)
