"""The code snapshot of `sweep submit` (launcher/code_snapshot.py): named by its content, made once and
reused, whole or absent, read-only, with source.json saying where it came from; and the setup lines
that make a job import it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from dino.config.identity import CODE_PACKAGES, code_hash_of
from launcher import code_snapshot
from launcher.executors import executor_parameters
from launcher.sweep_file import Resources, load_sweep


def source_tree(root: Path) -> dict[str, Path]:
    """A tiny stand-in for the three packages: a module, a preset, a compiled file."""
    for name in CODE_PACKAGES:
        (root / name / "__pycache__").mkdir(parents=True)
        (root / name / "__init__.py").write_text(f'"""{name}"""\n')
        (root / name / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    (root / "dino" / "conf").mkdir()
    (root / "dino" / "conf" / "preset.yaml").write_text("a: 1\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    return {name: root / name for name in CODE_PACKAGES}


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump({"name": "g", "root": str(tmp_path / "root"), "grid": {"train.seed": [0]}})
    )
    return load_sweep(path)


def test_a_snapshot_is_named_by_its_content_and_reused(tmp_path, sweep):
    folders = source_tree(tmp_path / "src")
    first = code_snapshot.snapshot(sweep, folders)
    assert first.created and first.path == tmp_path / "root" / "g" / "code" / first.code_hash
    assert first.code_hash == code_hash_of(tmp_path / "src") == code_hash_of(first.path)
    assert not (first.path / "dino" / "__pycache__").exists()  # what the hash counts, nothing else
    assert (first.path / "dino" / "conf" / "preset.yaml").read_text() == "a: 1\n"
    (sweep_copy,) = first.path.glob("grid-*.yaml")
    assert sweep_copy.read_text() == Path(sweep.path).read_text()
    assert not (first.path / "dino" / "__init__.py").stat().st_mode & 0o222  # read-only
    assert [p.name for p in first.path.parent.iterdir()] == [first.code_hash]  # no temporary folder left

    stamp = (first.path / code_snapshot.SOURCE_FILE).stat().st_mtime_ns
    again = code_snapshot.snapshot(sweep, folders)
    assert (again.code_hash, again.path, again.created) == (first.code_hash, first.path, False)
    assert (first.path / code_snapshot.SOURCE_FILE).stat().st_mtime_ns == stamp  # nothing rewritten

    (folders["launcher"] / "jobs.py").write_text("x = 1\n")
    edited = code_snapshot.snapshot(sweep, folders)
    assert edited.created and edited.code_hash != first.code_hash
    assert sorted(p.name for p in first.path.parent.iterdir()) == sorted([first.code_hash, edited.code_hash])


def test_source_json_records_the_commit_and_the_diff_of_a_dirty_tree(tmp_path, sweep):
    folders = source_tree(tmp_path / "src")
    git(tmp_path / "src", "init", "-q")
    git(tmp_path / "src", "add", ".")
    git(tmp_path / "src", "commit", "-q", "-m", "c")
    commit = git(tmp_path / "src", "rev-parse", "HEAD").strip()
    (folders["dino"] / "__init__.py").write_text('"""dino, edited"""\n')
    (folders["reports"] / "new.py").write_text("y = 2\n")  # untracked: in the snapshot, listed

    snap = code_snapshot.snapshot(sweep, folders)
    source = json.loads((snap.path / code_snapshot.SOURCE_FILE).read_text())
    assert source["code_hash"] == snap.code_hash and source["commit"] == commit and source["dirty"] is True
    assert '+"""dino, edited"""' in source["diff"] and "dino/__init__.py" in source["diff"]
    assert source["untracked"] == ["reports/new.py"] and (snap.path / "reports" / "new.py").exists()
    assert source["source_dir"] == str(tmp_path / "src") and source["created"].endswith("+00:00")


def test_a_tree_outside_git_has_no_commit(tmp_path, sweep):
    snap = code_snapshot.snapshot(sweep, source_tree(tmp_path / "src"))
    source = json.loads((snap.path / code_snapshot.SOURCE_FILE).read_text())
    assert (source["commit"], source["dirty"], source["diff"]) == ("", False, "")


def test_jobs_put_the_snapshot_first_on_their_path(tmp_path):
    setup = executor_parameters(Resources(setup=["echo hi"]), "local", "n", 1, "/s p/code/abc")["local_setup"]
    # After the stage's own setup; `-m` would put the folder the job starts in first (PYTHONSAFEPATH).
    assert setup[1:] == [
        "echo hi",
        "export PYTHONSAFEPATH=1",
        "export PYTHONPATH='/s p/code'/abc${PYTHONPATH:+:$PYTHONPATH}",
    ]
    assert "slurm_setup" in executor_parameters(Resources(), "slurm", "n", 1, "/c/abc")
    assert len(executor_parameters(Resources(), "local", "n", 1)["local_setup"]) == 1  # no snapshot, no line
