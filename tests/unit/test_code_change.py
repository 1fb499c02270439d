"""A resume with other code (dino/run/state.py:restore_latest): a checkpoint records the code hash and
the run's policy; `train.on_code_change` refuses naming both hashes, warns, or ("") follows the
policy the run was started with; a checkpoint from before code hashes is not checked."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dino.config.identity import code_hash
from dino.io import checkpoint
from dino.run.build import build_state
from dino.run.state import CodeMismatchError, ConfigMismatchError, TrainState, restore_latest
from tests.conftest import tiny_config

OTHER = "0123456789ab"  # the code hash of a checkpoint written by other code


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory) -> TrainState:
    """One tiny run's state for the module (building it is the tests' main cost): written, then resumed."""
    return build_state(tiny_config(tmp_path_factory.mktemp("run")), torch.device("cpu"), steps_per_epoch=4)


@pytest.fixture
def run_with(tmp_path, tiny_state):
    """Write a step-4 checkpoint as code `written_by` under `policy` would; returns its folder."""

    def write(written_by: str | None, policy: str | None) -> str:
        tiny_state.step = 4
        payload = tiny_state.state_dict()
        code = {"code_hash": written_by, "on_code_change": policy}
        payload["code"] = {k: v for k, v in code.items() if v is not None}
        path = checkpoint.save(str(tmp_path / "run"), 4, payload, "cfg", keep_last=2)
        if written_by is None:  # a checkpoint from before code hashes: no code in its marker
            marker_file = tmp_path / "run" / "checkpoints" / "000000004" / checkpoint.MARKER_FILE
            marker = json.loads(marker_file.read_text())
            del marker["code_hash"]
            marker_file.write_text(json.dumps(marker))
        return path

    return write


@pytest.fixture
def resume(tiny_cfg, tiny_state):
    """restore_latest of the run folder (or `run_dir`) with `overrides`: (checkpoint, state)."""

    def restore(*overrides: str, run_dir=None):
        tiny_state.on_code_change, tiny_state.step = "", 0
        return restore_latest(tiny_cfg(*overrides, run_dir=run_dir), tiny_state), tiny_state

    return restore


def test_a_checkpoint_records_the_code_hash_and_the_runs_policy(resume, tmp_path):
    _, fresh = resume("train.on_code_change=refuse")  # no checkpoint: a fresh start
    assert fresh.on_code_change == "refuse"
    checkpoint.save(str(tmp_path / "run"), 4, fresh.state_dict(), "cfg", keep_last=2)
    marker = checkpoint.load_latest(str(tmp_path / "run")).marker
    assert (marker["code_hash"], marker["on_code_change"]) == (code_hash(), "refuse")
    assert resume()[1].on_code_change == "refuse"  # same code: resumed, the run's policy kept
    assert resume(run_dir=tmp_path / "other")[1].on_code_change == "warn"  # `dinolab train`'s


def test_refuse_names_both_hashes_the_run_and_the_override(resume, tmp_path, run_with):
    run_with(OTHER, "warn")
    with pytest.raises(CodeMismatchError) as err:
        resume("train.on_code_change=refuse")
    message = str(err.value)
    assert OTHER in message and code_hash() in message and str(tmp_path / "run") in message
    assert "train.on_code_change=warn" in message
    assert isinstance(err.value, ConfigMismatchError)  # printed as one line by the CLI (user_errors)


def test_warn_logs_one_warning_and_resumes(resume, run_with, caplog):
    run_with(OTHER, "refuse")
    with caplog.at_level(logging.WARNING, logger="dino"):
        latest, state = resume("train.on_code_change=warn")
    assert latest.step == state.step == 4
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert OTHER in warning and code_hash() in warning
    assert state.on_code_change == "refuse"  # the run keeps the policy it was started with


@pytest.mark.parametrize("recorded", ["refuse", "warn", None])
def test_an_empty_setting_follows_the_policy_the_run_was_started_with(resume, run_with, caplog, recorded):
    run_with(OTHER, recorded)
    if recorded == "refuse":  # a sweep's run, resumed by hand with `dinolab train`
        with pytest.raises(CodeMismatchError, match="recorded when the run started"):
            resume()
        return
    with caplog.at_level(logging.WARNING, logger="dino"):
        assert resume()[0].step == 4  # no policy recorded: warn
    assert [r for r in caplog.records if r.levelno == logging.WARNING and OTHER in r.getMessage()]


def test_a_checkpoint_without_a_code_hash_is_not_checked(resume, run_with, caplog):
    run_with(None, None)
    with caplog.at_level(logging.WARNING, logger="dino"):
        assert resume("train.on_code_change=refuse")[0].step == 4
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
