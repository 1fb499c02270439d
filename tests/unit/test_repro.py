"""A run's reproducibility record (dino/run/repro.py): every field, a snapshot's source.json, git in a
checkout (clean, dirty, none, no git), and a resumed run's starts kept."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess

import pytest
import torch

from dino.config.identity import config_hash
from dino.config.schema import DinoConfig
from dino.data.datasets import epoch_seed
from dino.run import repro


@pytest.fixture
def cfg(tmp_path):
    cfg = DinoConfig()
    cfg.train.seed = 7
    cfg.run.dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def no_slurm(monkeypatch):
    for names in repro.SLURM_ENV.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)  # fmt: skip


@pytest.fixture
def checkout(tmp_path):
    """A git checkout holding a `dino` package, one commit."""
    root = tmp_path / "src"
    (root / "dino").mkdir(parents=True)
    (root / "dino" / "__init__.py").write_text("VALUE = 1\n")
    git(root, "init", "-q")
    git(root, "add", "dino/__init__.py")
    git(root, "commit", "-q", "-m", "one")
    return root


def test_the_record_holds_code_source_packages_torch_hosts_slurm_seeds_and_config_hash(cfg, no_slurm):
    record = repro.build_record(cfg, ["node-a", "node-a", "node-b"], "c0de")
    assert record["code_hash"] == "c0de" and record["config_hash"] == config_hash(cfg)
    assert record["hosts"] == ["node-a", "node-a", "node-b"] and record["world_size"] == 3
    assert record["packages"]["torch"] == importlib.metadata.version("torch")
    assert record["packages"]["numpy"] == importlib.metadata.version("numpy")
    assert set(record["packages"]) <= set(repro.PACKAGES)
    assert record["torch"]["version"] == torch.__version__ and record["torch"]["cuda"] == torch.version.cuda
    assert set(record["torch"]) >= {"cudnn", "nccl"}
    assert record["python"].count(".") == 2 and record["started"].endswith("+00:00")
    assert record["slurm"] == {}  # not under SLURM
    # train.seed + rank, as dino/run/loop.py:_resume seeds each rank's torch RNG on a fresh start
    assert record["seeds"]["train.seed"] == 7 and record["seeds"]["rank_torch_seeds"] == [7, 8, 9]
    assert "seed * 100003 + e" in record["seeds"]["data"]["order"] and epoch_seed(7, 2) == 7 * 100003 + 2
    assert record["source"]["from"] in ("git",) or record["source"]["from"].endswith("source.json")
    json.dumps(record)  # all of it is JSON


def test_the_slurm_job_comes_from_the_environment():
    env = {"SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_PARTITION": "gpu"}  # fmt: skip
    assert repro.slurm_ids(env) == {"job_id": "101", "array_job_id": "100", "array_task_id": "1",
                                    "restart_count": "2", "nodelist": "n[1-2]", "partition": "gpu"}  # fmt: skip
    assert repro.slurm_ids({"SLURM_JOB_ID": "5", "SLURM_NODELIST": "n3"})["nodelist"] == "n3"
    assert repro.slurm_ids({}) == {}


def test_a_snapshots_source_json_is_read_as_it_is(cfg, tmp_path, monkeypatch):
    snapshot = {"code_hash": "5ca1ab1e", "commit": "abc", "dirty": True, "diff": "+x = 1\n",
                "source_dir": "/home/u/dinolab", "created": "2026-12-06T10:00:00+00:00"}  # fmt: skip
    (tmp_path / "source.json").write_text(json.dumps(snapshot))
    monkeypatch.setattr(repro, "package_root", lambda: tmp_path)
    source = repro.build_record(cfg, ["h"], "5ca1ab1e")["source"]
    assert source == {"from": str(tmp_path / "source.json"), **snapshot}


def test_git_gives_commit_dirty_flag_and_the_diff(checkout):
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    clean = repro.source_info(checkout)
    assert clean["from"] == "git" and clean["commit"] == head.stdout.strip()
    assert clean["dirty"] is False and clean["diff"] == "" and clean["untracked"] == []

    (checkout / "dino" / "__init__.py").write_text("VALUE = 2\n")
    (checkout / "dino" / "new.py").write_text("")
    dirty = repro.source_info(checkout)
    assert dirty["dirty"] is True and dirty["commit"] == clean["commit"]
    assert "-VALUE = 1" in dirty["diff"] and "+VALUE = 2" in dirty["diff"]
    assert dirty["untracked"] == ["dino/new.py"]


def test_no_checkout_or_no_git_gives_an_empty_commit_and_never_fails(checkout, tmp_path, monkeypatch):
    loose = tmp_path / "site-packages"
    (loose / "dino").mkdir(parents=True)
    assert repro.git_source(loose)["commit"] == "" and repro.git_source(loose)["dirty"] is None
    inside = checkout / "venv"  # a package inside some checkout that does not track it
    (inside / "dino").mkdir(parents=True)
    (inside / "dino" / "__init__.py").write_text("")
    assert repro.git_source(inside)["commit"] == ""
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git at all
    found = repro.git_source(checkout)
    assert found["commit"] == "" and found["dirty"] is None


def test_a_second_start_is_added_to_starts_and_keeps_the_first(cfg, tmp_path, monkeypatch):
    first = repro.build_record(cfg, ["node-a"], "h1")
    path = repro.write_record(cfg.run.dir, first)
    assert path == str(tmp_path / "run" / "repro.json")
    saved = json.loads((tmp_path / "run" / "repro.json").read_text())
    assert saved["code_hash"] == "h1" and [s["hosts"] for s in saved["starts"]] == [["node-a"]]

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    second = repro.build_record(cfg, ["node-b", "node-c"], "h2")
    repro.write_record(cfg.run.dir, second)
    saved = json.loads((tmp_path / "run" / "repro.json").read_text())
    assert saved["code_hash"] == "h2" and saved["hosts"] == ["node-b", "node-c"]  # the newest start
    assert [(s["hosts"], s["code_hash"]) for s in saved["starts"]] == [(["node-a"], "h1"),
                                                                         (["node-b", "node-c"], "h2")]  # fmt: skip
    assert saved["starts"][1]["slurm"]["job_id"] == "77" and saved["starts"][0]["time"] == first["started"]


def test_an_unreadable_record_is_replaced_not_fatal(cfg, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "repro.json").write_text('{"cut')
    repro.write_record(cfg.run.dir, {"code_hash": "h", "hosts": ["x"], "started": "t"})
    saved = json.loads((tmp_path / "run" / "repro.json").read_text())
    assert [s["hosts"] for s in saved["starts"]] == [["x"]]
