"""The sweep's manifest: what `sweep submit` resolved, so `status`, `logs` and `cancel` read it back.

Expanding a sweep composes and hashes every run's config; on a 1,000-run search that is the
commands' main cost, repeated on every `status --watch` refresh. `submit` already knows each run's
name, id, folder and overrides, so it keeps them in `<sweep folder>/manifest.json`; later commands
read that one file instead of expanding again, and then read each run's own files.

The manifest is used only while it describes the same grid: it carries a fingerprint of what decides
the runs (the sweep's base, axes, seeds, names, root and tracking store, after command-line edits)
and of the config schema and presets (dino/config/schema.py, dino/conf): a different fingerprint means an
edited sweep or a dinolab whose defaults changed, and the sweep is expanded as before.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import time
from typing import Any

from dino.io import storage
from launcher.grid import RunSpec, expand
from launcher.sweep_file import Sweep

MANIFEST = "manifest.json"
# The Sweep fields that decide which runs exist, their ids and their folders.
_GRID_FIELDS = ("name", "root", "base", "grid", "zip", "seeds", "short_names", "tracking_uri")


def path(sweep: Sweep) -> str:
    return storage.join(sweep.folder, MANIFEST)


def _schema_files() -> list[Any]:
    """dino/config/ (the schema's defaults and the identity rules) and every preset under dino/conf: a
    change of either can change run ids."""
    config = importlib.resources.files("dino.config")
    files = sorted((e for e in config.iterdir() if e.name.endswith(".py")), key=lambda e: e.name)
    pending = [importlib.resources.files("dino.conf")]
    while pending:
        folder = pending.pop()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                pending.append(entry)
            elif entry.name.endswith((".yaml", ".py")):
                files.append(entry)
    return files


def fingerprint(sweep: Sweep) -> str:
    digest = hashlib.sha256()
    grid = {name: getattr(sweep, name) for name in _GRID_FIELDS}
    digest.update(json.dumps(grid, sort_keys=True, default=str).encode())
    for file in _schema_files():
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def write(sweep: Sweep, runs: list[RunSpec]) -> None:
    """Keep every run of the sweep (`runs` = the whole expansion, not a `--run` selection)."""
    content = {
        "fingerprint": fingerprint(sweep),
        "written": time.time(),
        "runs": [
            {
                "name": r.name,
                "run_id": r.run_id,
                "run_dir": r.run_dir,
                "overrides": r.overrides,
                "axes": r.axes,
                "seed": r.seed,
            }  # fmt: skip
            for r in runs
        ],
    }
    storage.makedirs(sweep.folder)
    storage.atomic_write_text(path(sweep), json.dumps(content))


def read(sweep: Sweep) -> list[RunSpec] | None:
    """The runs the manifest keeps, or None when there is none or it describes another grid."""
    try:
        content = json.loads(storage.read_text(path(sweep)))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    if not isinstance(content, dict) or content.get("fingerprint") != fingerprint(sweep):
        return None
    try:
        return [RunSpec(**run) for run in content["runs"]]
    except (KeyError, TypeError):
        return None


def runs(sweep: Sweep) -> list[RunSpec]:
    """The sweep's runs: from its manifest when it is current, else expanded (validated) again."""
    kept = read(sweep)
    return kept if kept is not None else expand(sweep)
