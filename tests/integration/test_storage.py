"""Storage on local paths and on a real S3-compatible server, from the same parametrised tests:
publishing, logs, checkpoints, training killed and resumed, an outage during a checkpoint upload,
clear errors, and credentials that never leave the environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dino.io import checkpoint, object_store, storage
from tests.conftest import load_final
from tests.integration.cli import DINOLAB, REPO, TINY, dinolab, env
from tests.s3_server import ACCESS_KEY, SECRET_KEY


def test_publish_read_list_remove(store_root):
    path = storage.join(store_root, "a", "b.json")
    storage.makedirs(storage.parent(path))
    storage.atomic_write_text(path, '{"x": 1}')
    storage.atomic_write_text(path, '{"x": 2}')  # replaced whole
    assert storage.read_text(path) == '{"x": 2}'
    storage.atomic_write_bytes(storage.join(store_root, "a", "c.bin"), b"\0" * 10)
    assert storage.listdir(storage.join(store_root, "a")) == ["b.json", "c.bin"]  # no temporary leftovers
    assert storage.exists(path) and not storage.exists(storage.join(store_root, "missing"))
    storage.remove(storage.join(store_root, "a"))
    assert storage.listdir(store_root) == [] and not storage.exists(path)


def test_append_log_continues_the_published_file(store_root):
    path = storage.join(store_root, "metrics.jsonl")
    first = storage.AppendLog(path)
    first.append("1\n")
    first.append("2\n")
    first.close()
    second = storage.AppendLog(path)  # a resumed run continues the same file
    second.append("3\n")
    assert second.snapshot() == b"1\n2\n3\n"
    second.sync()
    assert storage.read_text(path) == "1\n2\n3\n"
    second.close()


def test_append_log_drops_a_partial_last_line_before_appending(store_root, caplog):
    """A file left ending in half a line (a process killed mid-append) is cut back to its last whole
    line on opening, so the next line does not extend the broken one."""
    path = storage.join(store_root, "metrics.jsonl")
    storage.atomic_write_text(path, '{"step": 1}\n{"step": 2}\n{"st')
    with caplog.at_level("WARNING", logger="dino.storage"):
        log = storage.AppendLog(path)
    assert f"{path} ended in a partial line (4 bytes, an interrupted write): removed" in caplog.text
    log.append('{"step": 3}\n')
    log.close()
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    one_line = storage.join(store_root, "one.log")
    storage.atomic_write_text(one_line, "no newline at all")
    log = storage.AppendLog(one_line)
    log.append("whole\n")
    log.close()
    assert storage.read_text(one_line) == "whole\n"


def test_append_log_uploads_only_what_was_not_published(store_root, monkeypatch):
    """The checkpoint writer publishes log snapshots with each checkpoint; closing the log afterwards
    uploads again only if something was appended since."""
    path = storage.join(store_root, "train.log")
    log = storage.AppendLog(path)
    log.append("a\n")
    storage.atomic_write_bytes(path, log.snapshot())  # what the checkpoint writer does
    log.published(2)
    uploads = []
    monkeypatch.setattr(storage, "upload_file", lambda local, remote: uploads.append(remote))
    log.sync()
    assert uploads == []
    log.append("b\n")
    log.close()
    assert uploads == ([path] if storage.is_remote(path) else [])  # local files are appended to


def test_partial_and_corrupt_checkpoints_are_skipped(store_root):
    state = {"w": torch.arange(4.0)}
    checkpoint.save(store_root, 4, state, "h", keep_last=5)
    # step 8: state written, marker never (interrupted upload); step 12: marker of another file
    storage.atomic_write_bytes(storage.join(checkpoint.checkpoint_path(store_root, 8), "state.pt"), b"x")
    checkpoint.save(store_root, 12, {"w": torch.zeros(4)}, "h", keep_last=5)
    storage.atomic_write_bytes(storage.join(checkpoint.checkpoint_path(store_root, 12), "state.pt"), b"y")
    latest = checkpoint.load_latest(store_root)
    assert latest is not None and latest.step == 4 and torch.equal(latest.state["w"], state["w"])
    assert checkpoint.complete_steps(store_root) == [4, 12]


def test_old_checkpoints_are_pruned_only_after_a_newer_one_is_complete(store_root):
    for step in (1, 2, 3):
        checkpoint.save(store_root, step, {"s": torch.tensor(step)}, "h", keep_last=2)
    assert checkpoint.complete_steps(store_root) == [2, 3]
    storage.atomic_write_bytes(
        storage.join(checkpoint.checkpoint_path(store_root, 4), "state.pt"), b"partial"
    )
    checkpoint.prune(store_root, keep_last=1)  # 4 is not complete: 3 stays
    assert checkpoint.complete_steps(store_root) == [3]


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-1' does not exist"):
        storage.atomic_write_text("s3://no-such-bucket-1/run/config.yaml", "x")
    result = dinolab("train", *TINY, "run.dir=s3://no-such-bucket-2/run")
    assert result.returncode == 2 and "bucket 'no-such-bucket-2' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_credentials_say_where_they_come_from(s3_env, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    result = dinolab("train", *TINY, "run.dir=s3://dinolab-test/no-credentials")
    assert result.returncode == 2, result.stderr
    assert "no credentials" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_endpoint_is_retried_then_reported(s3_env, monkeypatch):
    monkeypatch.setattr(object_store, "RETRIES", 2)
    monkeypatch.setattr(object_store, "RETRY_WAIT_S", 0.1)
    s3_env.stop_proxy()
    try:
        with pytest.raises(
            storage.StorageError, match="cannot reach the S3 endpoint .*2 attempts.*AWS_ENDPOINT_URL"
        ):
            storage.read_bytes("s3://dinolab-test/anything")
    finally:
        s3_env.start_proxy()


def _closed_port() -> int:
    """A port nothing listens on: bound, then closed (a connection to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_not_a_missing_bucket(s3_env, monkeypatch):
    """s3fs answers "no such bucket" for an endpoint it cannot reach (after ~24 s of botocore
    retries); the bucket check reaches the endpoint first and says so, in seconds."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(object_store, "RETRIES", 3)  # the default
    monkeypatch.setattr(object_store, "_options", {})
    monkeypatch.setattr(object_store, "_checked_buckets", set())
    storage.configure(endpoint)
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.makedirs("s3://bucket/x")
    took = time.monotonic() - start
    assert str(err.value) == (
        f"cannot reach the S3 endpoint {endpoint} to write s3://bucket/x (connection refused; 3 attempts): "
        "check storage.endpoint_url and the network"
    )
    assert took < 10, f"{took:.1f} s to report a refused connection"  # 3 s of waits between the attempts

    result = dinolab("train", *TINY, "run.dir=s3://bucket/x", f"storage.endpoint_url={endpoint}")
    assert result.returncode == 2, result.stderr
    line = f"dinolab train: error: cannot reach the S3 endpoint {endpoint} to write s3://bucket/x (connection refused;"
    assert result.stderr.startswith(line), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr  # one line


def test_missing_bucket_at_a_configured_endpoint_is_named(s3_env, monkeypatch):
    """The endpoint answers (the real S3 server, named by storage.endpoint_url): the bucket is missing."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")  # the config wins
    result = dinolab(
        "train", *TINY, "run.dir=s3://no-such-bucket-3/x", f"storage.endpoint_url={s3_env.endpoint}"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "dinolab train: error: cannot write s3://no-such-bucket-3/x: bucket 'no-such-bucket-3' does not "
        f"exist at {s3_env.endpoint}. Create it first or fix the path.\n"
    )


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(v, b[part][k]) for part in ("student", "teacher") for k, v in a[part].items())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted local run of KILL_ARGS: the weights every interrupted run must end with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = dinolab("train", *KILL_ARGS, f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return load_final(run_dir)


KILL_ARGS = [*TINY, "optim.epochs=4", "train.checkpoint_every_steps=8"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(store_root, reference_run):
    """SIGKILL a real training process after its first checkpoint (on disk or on the S3 server);
    started again it resumes from that checkpoint and ends where the uninterrupted run ends, to the bit."""
    run_dir = storage.join(store_root, "run")
    proc = subprocess.Popen([*DINOLAB, "train", *KILL_ARGS, f"run.dir={run_dir}"], env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for(lambda: checkpoint.complete_steps(run_dir) or proc.poll() is not None, 300, "a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.complete_steps(run_dir)
    assert killed_at and killed_at[-1] < 32, "the process should have died mid-run"

    again = dinolab("train", *KILL_ARGS, f"run.dir={run_dir}")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {checkpoint.checkpoint_path(run_dir, killed_at[-1])}" in again.stderr
    assert _same_weights(reference_run, load_final(run_dir))
    # the run's logs are published next to its checkpoints, on an object store too
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in storage.read_text(
        storage.join(run_dir, "metrics.jsonl")).splitlines()]  # fmt: skip
    assert steps[-1] == 32 and "resumed from" in storage.read_text(storage.join(run_dir, "train.log"))


@pytest.mark.slow
@pytest.mark.heavy
def test_outage_during_a_checkpoint_upload_keeps_the_previous_one(s3_env, reference_run, tmp_path):
    """The endpoint dies while a checkpoint is being uploaded: training says so and goes on, the
    previous checkpoint stays complete, the run ends with a clear error, and once the endpoint is
    back the same command resumes from the last complete checkpoint to the uninterrupted weights.
    Then no file, object, log or MLflow record holds the credentials."""
    run_dir = "s3://dinolab-test/outage/run"
    tracking = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    s3_env.start_proxy(rate=400_000)  # ~6 s per 2.5 MB checkpoint: the kill lands mid-upload
    run_env = {**env(), "DINOLAB_STORAGE_RETRIES": "1", "AWS_MAX_ATTEMPTS": "2"}
    out = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([*DINOLAB, "train", *KILL_ARGS, f"run.dir={run_dir}", tracking], env=run_env,
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    marker_8 = "outage/run/checkpoints/000000008/COMPLETE.json"
    _wait_for(lambda: marker_8 in s3_env.keys(run_dir) or proc.poll() is not None, 300, "checkpoint 8")
    _wait_for(lambda: "step 16" in (tmp_path / "first.log").read_text() or proc.poll() is not None, 60,
              "training past step 16")  # fmt: skip
    time.sleep(1.0)  # the step-16 upload is under way through the throttled proxy
    s3_env.stop_proxy()
    try:
        assert proc.wait(300) == 2
    finally:
        s3_env.start_proxy()
    first = (tmp_path / "first.log").read_text()
    assert "checkpoint of step 16 NOT written" in first
    assert "The newest complete checkpoint is still step 8" in first
    assert "could not be written" in first.splitlines()[-1] and "Traceback" not in first
    assert checkpoint.complete_steps(run_dir) == [8]

    again = dinolab("train", *KILL_ARGS, f"run.dir={run_dir}", tracking)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {checkpoint.checkpoint_path(run_dir, 8)}" in again.stderr
    assert _same_weights(reference_run, load_final(run_dir))

    # Credentials never leave the environment.
    texts = {
        "first process output": first.encode(),
        "second process output": (again.stdout + again.stderr).encode(),
    }
    texts |= {f"s3://dinolab-test/{key}": s3_env.read(run_dir, key) for key in s3_env.keys(run_dir)}
    texts |= {
        str(p): p.read_bytes() for p in Path(tmp_path).rglob("*") if p.is_file()
    }  # MLflow db, artifacts
    assert len(texts) > 10
    leaks = [
        name for name, data in texts.items() if SECRET_KEY.encode() in data or ACCESS_KEY.encode() in data
    ]
    assert not leaks, f"credentials written to {leaks}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY  # the test did have them to leak
