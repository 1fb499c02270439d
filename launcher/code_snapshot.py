"""The code a sweep's jobs run: a copy of dinolab made at `sweep submit`, named by its content hash.

A queued job starts hours after `submit`, and a requeued one days after; importing dinolab from the
working tree then would run whatever is on disk at that moment, and one table would mix code
versions. So `submit` copies the `dino`, `launcher` and `reports` packages (every file
`dino.config.identity.code_hash` counts) and the sweep file into `<sweep folder>/code/<hash>/`, and
every stage's setup puts that folder first on PYTHONPATH (`launcher/executors.py:pythonpath_setup`):
the job, and each requeue of it, imports the snapshot before the editable install, whose finder
comes after the path on `sys.meta_path`. Its `code_hash()` is then the folder's name.

A snapshot is content-addressed: a second `submit` with the same code reuses it and rewrites nothing.
It is written to a hidden temporary folder and renamed into place, so a folder named by a hash is
always whole; the copy is hashed again before the rename, so an edit during the copy is refused
instead of named wrongly. Its files are read-only: a path in a job's traceback points into the
snapshot, and an edit there would change a snapshot that other runs share.

`source.json` beside the packages records where the copy came from: the commit and, for a dirty
tree, `git diff HEAD` and the untracked files of the packages; a run finds it at
`Path(dino.__file__).parent.parent / "source.json"`.

Why not `submitit.helpers.RsyncSnapshot`: it needs rsync and a git checkout (it copies the files git
tracks, so an untracked new module is silently left out), it chdirs the submitting process into the
copy, and it names the copy by time, not content: every submit copies again, and nothing says that
two runs used the same code.

The snapshot must be importable on every node, so it lies on a shared file system: the sweep's
folder for a local root, else the sweep's scheduler folder (`logs_root`, `~/dinolab`). It is written
with pathlib, not dino/io/storage.py, for that reason: it is never in an object store.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from dino.config.identity import CODE_PACKAGES, code_files, hash_folders, package_folders
from dino.io import storage
from launcher.errors import UserError
from launcher.sweep_file import Sweep

SNAPSHOTS = "code"
SOURCE_FILE = "source.json"
PLACEHOLDER = "<code hash>"
"""What `sweep plan` shows for the hash: it writes nothing, and the code may change before `submit`."""


class SnapshotError(UserError):
    """The code could not be snapshotted; the message names the folder and what to do."""


@dataclass(frozen=True)
class Snapshot:
    code_hash: str
    path: Path
    """The folder holding dino/, launcher/, reports/ and source.json: what jobs put on PYTHONPATH."""
    created: bool
    """False when a snapshot of the same code was already there and is reused."""


def snapshots_folder(sweep: Sweep) -> Path:
    """`<sweep folder>/code` (absolute: jobs start elsewhere), on a shared file system: the sweep's
    folder for a local root, its scheduler folder when the runs are in an object store."""
    folder = sweep.local_folder if storage.is_remote(sweep.root) else sweep.folder
    return Path(os.path.abspath(os.path.join(folder, SNAPSHOTS)))


def snapshot(sweep: Sweep, folders: dict[str, Path] | None = None) -> Snapshot:
    """The snapshot of the code `folders` hold (default: the packages this process imported), made
    unless one of the same hash is there."""
    folders = folders or package_folders()
    code_hash = hash_folders(folders)
    root = snapshots_folder(sweep)
    target = root / code_hash
    if target.is_dir():  # only a whole snapshot is ever renamed to its hash
        return Snapshot(code_hash, target, created=False)
    temp = root / f".tmp-{code_hash}-{uuid.uuid4().hex[:8]}"
    try:
        _copy(folders, temp)
        copied = hash_folders({name: temp / name for name in folders})
        if copied != code_hash:
            raise SnapshotError(
                f"the dinolab source in {_source_dir(folders)} changed while it was copied to {root} "
                f"(code hash {code_hash}, then {copied}); submit again once the edit is saved"
            )
        _copy_sweep_file(sweep, temp)
        source = {"code_hash": code_hash, **git_state(folders), "source_dir": str(_source_dir(folders)),
                  "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
        (temp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
        _read_only(temp)
        try:
            temp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another submit of the same code renamed its copy first: the same bytes, use that one.
            return Snapshot(code_hash, target, created=False)
        return Snapshot(code_hash, target, created=True)
    except OSError as err:
        raise SnapshotError(
            f"cannot snapshot the dinolab code into {root}: {err}; the sweep's folder must be writable"
        ) from None
    finally:
        if temp.exists():  # a failed copy (its files are read-only, its folders are not)
            shutil.rmtree(temp, ignore_errors=True)


def _source_dir(folders: dict[str, Path]) -> Path:
    """The folder above the packages (a checkout's root, or site-packages)."""
    return folders["dino"].parent if "dino" in folders else next(iter(folders.values())).parent


def _copy(folders: dict[str, Path], to: Path) -> None:
    """Exactly the files the code hash counts, nothing else (no __pycache__)."""
    for name, folder in folders.items():
        for path in code_files(folder):
            dest = to / name / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def _copy_sweep_file(sweep: Sweep, to: Path) -> None:
    """The sweep file as this submit read it. It is not part of the code hash (the runs' configs are
    in their folders), so it is named by its own content: a reused snapshot keeps it beside the first
    submit's, if it changed since, and rewrites nothing."""
    data = storage.read_bytes(sweep.path)
    stem, suffix = os.path.splitext(os.path.basename(sweep.path))
    to.mkdir(parents=True, exist_ok=True)
    (to / f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{suffix}").write_bytes(data)


def _read_only(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _git(source_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=60)


def git_state(folders: dict[str, Path]) -> dict[str, object]:
    """{"commit", "dirty", "diff", "untracked"} of the git checkout the packages come from;
    commit "" (and a clean, empty rest) where they are not tracked by git (an installed wheel, a copy)."""
    source_dir = _source_dir(folders)
    none = {"commit": "", "dirty": False, "diff": "", "untracked": []}
    try:
        # The packages must be tracked here: site-packages inside some other repository is no checkout.
        tracked = _git(
            source_dir, "ls-files", "--error-unmatch", "--", *(f"{n}/__init__.py" for n in folders)
        )
        if tracked.returncode != 0:
            return none
        commit = _git(source_dir, "rev-parse", "HEAD").stdout.strip()
        diff = _git(source_dir, "diff", "HEAD").stdout
        others = _git(source_dir, "ls-files", "--others", "--exclude-standard", "--", *folders).stdout
    except (OSError, subprocess.SubprocessError):
        return none
    untracked = sorted(line for line in others.splitlines() if _is_code(line))
    return {"commit": commit, "dirty": bool(diff or untracked), "diff": diff, "untracked": untracked}


def _is_code(relative: str) -> bool:
    """A file the snapshot holds (what `code_files` yields), by its path in the checkout."""
    parts = relative.split("/")
    hidden = any(p == "__pycache__" or p.startswith(".") for p in parts)
    return parts[0] in CODE_PACKAGES and not hidden and not relative.endswith((".pyc", ".pyo"))
