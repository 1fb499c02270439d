"""A run's identity: the hash of the configuration keys that can change its result; and the code's
identity: the hash of the dinolab source a process imported (`code_hash`).

Which keys those are is marked on the schema's fields (dino/config/schema.py): `not_in_run_id` for a key
or a whole section that cannot change a result (folders, tracking, workers, the collapse guard...),
`added_later` for a key added after runs existed, left out at the value that reproduces the old
behaviour. Same id, same run folder: `tests/unit/test_config_run_ids.py` pins known ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
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
    if isinstance(cfg, DinoConfig):
        cfg = to_dict(cfg)
    # A flat dict (the composer's, one per run of a sweep) is its own flattening: it is read as it is,
    # with which of its keys count decided once per set of keys (`_counted`), not per key and run.
    flat = flatten(cfg) if any(map(isinstance, cfg.values(), itertools.repeat(dict))) else cfg
    counted, later = _counted(tuple(flat))
    return {k: flat[k] for k in counted if k not in later or later[k] != flat[k]}


@functools.lru_cache(maxsize=64)
def _counted(keys: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(the `keys` that can change a result, {those marked `added_later`: their old-behaviour value}):
    `_identifying` of `semantic_items`, decided per key once."""
    later = _schema_marks()[1]
    counted = tuple(k for k in keys if is_semantic(k))
    return counted, {k: later[k] for k in counted if k in later}


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


_SORTED_JSON = json.JSONEncoder(sort_keys=True)
"""`json.dumps(..., sort_keys=True)` without building its encoder anew for each of a sweep's runs."""


def config_hash(cfg: DinoConfig | dict[str, Any]) -> str:
    """Short hash of the keys that change the result: same hash, same run. `cfg` may also be its
    nested or flat (dotted keys) dict."""
    blob = _SORTED_JSON.encode(semantic_items(cfg))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def semantic_diff(saved: dict[str, Any], current: DinoConfig) -> list[str]:
    """Human-readable `key: saved -> current` lines for every semantic key that differs."""
    old, new = semantic_items(saved), semantic_items(current)
    return [
        f"{key}: {old.get(key, '<missing>')!r} -> {new.get(key, '<missing>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


# ---- the code's identity ---------------------------------------------------------------------------
CODE_PACKAGES = ("dino", "launcher", "reports")
"""The packages whose source is dinolab's code: what a sweep snapshots (launcher/code_snapshot.py)."""


def code_files(folder: Path) -> Iterator[Path]:
    """Every file under a package folder but compiled ones (`__pycache__/`, `*.pyc`: the interpreter's,
    not the code) and hidden ones (editor swap and lock files such as `.#loop.py`, never package data)."""
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part == "__pycache__" or part.startswith(".") for part in relative):
            continue
        if path.suffix in (".pyc", ".pyo") or not path.is_file():
            continue
        yield path


def hash_folders(folders: dict[str, Path]) -> str:
    """12 hex characters of SHA-256 over every code file of the packages {name: folder}, sorted by
    their path relative to the folder above the packages (`dino/io/checkpoint.py`), path and bytes."""
    files = sorted(
        (f"{name}/{path.relative_to(folder).as_posix()}", path)
        for name, folder in folders.items()
        for path in code_files(folder)
    )
    digest = hashlib.sha256()
    for relative, path in files:
        data = path.read_bytes()
        # Lengths delimit each part, so no two different trees can feed the same bytes to the hash.
        digest.update(f"{len(relative)}:{relative}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()[:12]


def package_folders() -> dict[str, Path]:
    """{package: its folder} for dinolab's code packages as this process imports them: a package
    already imported by its `__file__`, the others where an import would find them (PYTHONPATH
    first, so a sweep job sees its snapshot), without importing them: dino imports nothing of the
    launcher or the reports (tests/unit/test_layers.py)."""
    folders = {}
    for name in CODE_PACKAGES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        if origin is None:  # dino alone, installed without the launcher
            continue
        folders[name] = Path(origin).resolve().parent
    return folders


@functools.cache  # the code of a process does not change: hashing ~1 MB once is enough
def code_hash() -> str:
    """The content hash of the dinolab code this process imported (`dino`, `launcher` and `reports`:
    every source and data file, e.g. the presets' YAML); a sweep job that imports its snapshot gets
    the hash that names the snapshot's folder (`code_hash_of`)."""
    return hash_folders(package_folders())


def code_hash_of(root: Path | str) -> str:
    """`code_hash` of the source tree at `root` (the folder holding dino/, launcher/, reports/)."""
    root = Path(root)
    return hash_folders({name: root / name for name in CODE_PACKAGES if (root / name).is_dir()})
