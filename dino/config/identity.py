"""A run's identity: the hash of the configuration keys that can change its result.

Which keys those are is marked on the schema's fields (dino/config/schema.py): `not_in_run_id` for a key
or a whole section that cannot change a result (folders, tracking, workers, the collapse guard...),
`added_later` for a key added after runs existed, left out at the value that reproduces the old
behaviour. Same id, same run folder: `tests/unit/test_config_run_ids.py` pins known ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from collections.abc import Callable
from typing import Any

from dino.config.schema import ADDED_LATER, NOT_IN_RUN_ID, DinoConfig, flatten, to_dict


def _marks(cls: type, prefix: str = "") -> tuple[list[str], dict[str, Any]]:
    """(keys or sections left out of the id, {key added later: its old-behaviour value}) of `cls`."""
    left_out: list[str] = []
    later: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get(NOT_IN_RUN_ID):
            left_out.append(key)
        elif ADDED_LATER in f.metadata:
            later[key] = f.metadata[ADDED_LATER]
        elif dataclasses.is_dataclass(hints[f.name]):
            sub_left_out, sub_later = _marks(hints[f.name], key + ".")
            left_out += sub_left_out
            later.update(sub_later)
    return left_out, later


def marked_fields(cls: type) -> frozenset[str]:
    """The fields of `cls` marked `not_in_run_id` or `added_later`: what cannot change a result."""
    return frozenset(
        f.name for f in dataclasses.fields(cls) if NOT_IN_RUN_ID in f.metadata or ADDED_LATER in f.metadata
    )


@functools.cache
def _schema_marks() -> tuple[frozenset[str], dict[str, Any]]:
    left_out, later = _marks(DinoConfig)
    return frozenset(left_out), later


@functools.cache  # asked for every key of every run of a sweep
def is_semantic(key: str) -> bool:
    """Whether `key` (dotted) can change a run's result: neither it nor a section above it is marked
    `not_in_run_id`. A key the schema no longer has counts (an old checkpoint's config keeps it)."""
    return not _left_out(key, _schema_marks()[0])


def _left_out(key: str, left_out: frozenset[str] | list[str]) -> bool:
    """Whether dotted `key` or a section above it is among `left_out`."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in left_out for n in range(1, len(parts) + 1))


def semantic_items(cfg: DinoConfig | dict[str, Any]) -> dict[str, Any]:
    """The flat {dotted key: value} that identifies a run (`cfg` nested or flat)."""
    flat = flatten(to_dict(cfg) if isinstance(cfg, DinoConfig) else cfg)
    return _identifying(flat, is_semantic, _schema_marks()[1])


_ABSENT = object()


def _identifying(
    flat: dict[str, Any], counts: Callable[[str], bool], later: dict[str, Any]
) -> dict[str, Any]:
    """The items of `flat` whose key `counts`, but those marked `added_later` at their old value."""
    return {k: v for k, v in flat.items() if counts(k) and later.get(k, _ABSENT) != v}


def identity_items(cfg: Any) -> dict[str, Any]:
    """The flat {dotted key: value} of any config dataclass that identifies its result, read off its
    own field marks as `semantic_items` reads the schema's: keys marked `not_in_run_id` (or under a
    section so marked) left out, keys marked `added_later` left out at their old value. The linear
    probe's id (dino/eval/linear.py:probe_id) is built on this over `LinearConfig`."""
    left_out, later = _marks(type(cfg))
    return _identifying(flatten(to_dict(cfg)), lambda key: not _left_out(key, left_out), later)


def config_hash(cfg: DinoConfig | dict[str, Any]) -> str:
    """Short hash of the keys that change the result: same hash, same run. `cfg` may also be its
    nested or flat (dotted keys) dict."""
    blob = json.dumps(semantic_items(cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def semantic_diff(saved: dict[str, Any], current: DinoConfig) -> list[str]:
    """Human-readable `key: saved -> current` lines for every semantic key that differs."""
    old, new = semantic_items(saved), semantic_items(current)
    return [
        f"{key}: {old.get(key, '<missing>')!r} -> {new.get(key, '<missing>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
