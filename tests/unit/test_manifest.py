"""The sweep manifest (launcher/manifest.py): submit's resolution read back by status, logs, cancel."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from dino.config.schema import to_dict
from launcher import manifest, records
from launcher.commands import sweep as long_tables
from launcher.grid import expand
from launcher.status import status_table
from launcher.sweep_file import load_sweep

QUICKSTART = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart.yaml"


def _sweep(tmp_path, **edits):
    raw = yaml.safe_load(QUICKSTART.read_text()) | {"root": str(tmp_path / "runs")} | edits
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_sweep(path)


def _identity(runs):
    return [(r.name, r.run_id, r.run_dir, r.overrides, r.axes, r.seed) for r in runs]


def test_status_reads_the_runs_submit_resolved_without_composing(tmp_path, monkeypatch):
    sweep = _sweep(tmp_path)
    expanded = expand(sweep)
    manifest.write(sweep, expanded)

    def no_expansion(_sweep):
        raise AssertionError("expanded although the manifest is current")

    monkeypatch.setattr(manifest, "expand", no_expansion)
    kept = manifest.runs(sweep)
    assert _identity(kept) == _identity(expanded)
    assert all(r.resolved is None for r in kept)  # nothing composed yet
    assert to_dict(kept[1].config) == to_dict(expanded[1].config)  # composed when asked
    assert kept[1].job_config() == expanded[1].job_config()  # a job submitted from either: the same config


@pytest.mark.parametrize(
    "edit",
    [
        {"seeds": [0, 1]},
        {"base": ["data=fashion_mnist", "model=vit_test", "optim.lr=0.001"]},
        {"name": "other"},
    ],
)
def test_an_edited_grid_is_expanded_again(tmp_path, edit):
    sweep = _sweep(tmp_path)
    manifest.write(sweep, expand(sweep))
    edited = _sweep(tmp_path, **edit)
    assert manifest.read(edited) is None
    assert _identity(manifest.runs(edited)) == _identity(expand(edited))


def test_a_resources_edit_keeps_the_manifest_and_a_broken_one_is_ignored(tmp_path):
    sweep = _sweep(tmp_path)
    manifest.write(sweep, expand(sweep))
    assert manifest.read(_sweep(tmp_path, array_parallelism=1)) is not None  # does not change the runs
    Path(manifest.path(sweep)).write_text('{"fingerprint": ')  # a partial write by something else
    assert manifest.read(sweep) is None
    assert len(manifest.runs(sweep)) == 4


def test_a_long_status_is_plain_columns_with_every_run(tmp_path, monkeypatch):
    sweep = _sweep(tmp_path)
    runs = expand(sweep)
    records.update_record(runs[0].run_dir, state=records.COMPLETED, step=128, total_steps=128, loss=5.25)
    records.update_record(runs[1].run_dir, state=records.FAILED, step=3, total_steps=128, error="boom [x]")
    monkeypatch.setattr(long_tables, "LONG", 2)
    out = io.StringIO()
    long_tables.show(Console(file=out, width=300), status_table(sweep, runs))
    lines = out.getvalue().splitlines()
    assert lines[0] == f"sweep quickstart ({sweep.folder})"
    header = lines[1].split()
    assert header[:3] == ["run", "teacher.momentum", "crops.num_local"] and "note" in header
    rows = {line.split()[0]: line for line in lines[3:-1]}
    assert set(rows) == {r.name for r in runs}
    assert "completed" in rows[runs[0].name] and "128/128 (100%)" in rows[runs[0].name]
    assert "failed" in rows[runs[1].name] and "boom [x]" in rows[runs[1].name]
    assert lines[-1] == "1 completed, 1 failed, 2 new"
