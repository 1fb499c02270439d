"""The checks of a sweep file that need no sweep: its values against the types of the schema's fields,
one task per GPU, a YAML error as one line, environment variables in its paths. Every message starts
with the file and names the key (launcher/sweep.py reads the file and builds the `Sweep`)."""

from __future__ import annotations

import os
import re
import typing
from typing import Any

import yaml

from dino.config.types import fits, type_name, type_words


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
