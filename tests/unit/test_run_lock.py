"""The run folder's lock (dino/io/run_lock.py), on a local folder and on a real S3-compatible server."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dino.io import run_lock, storage
from dino.io.run_lock import LockLost, RunLock, RunLocked


def test_a_second_holder_is_refused_with_the_first_ones_description(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with RunLock(str(tmp_path / "run")) as first:
        first.acquire()
        with pytest.raises(
            RunLocked, match=r"is being trained by another process: pid \d+ on .*SLURM job 4242, since"
        ):
            RunLock(str(tmp_path / "run")).acquire()
    RunLock(str(tmp_path / "run")).acquire()  # released: free again


def test_a_contender_meeting_the_holder_between_its_flock_and_its_description_names_it(tmp_path):
    """The holder takes the flock, then writes who it is: a contender started at the same instant
    reads an empty file (CI saw "another process (no description)"). It reads again until the
    description is there."""
    import fcntl

    path = tmp_path / run_lock.LOCK_FILE
    with open(path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        description = run_lock.holder_description()

        def write_late() -> None:
            held.write(json.dumps(description)[:20])  # half written first
            held.flush()
            time.sleep(0.3)
            held.seek(0)
            held.truncate()
            held.write(json.dumps(description))
            held.flush()

        threading.Timer(0.3, write_late).start()
        with pytest.raises(RunLocked, match=f"another process: pid {os.getpid()} on"):
            RunLock(str(tmp_path)).acquire()


def _hold(path: str, ready) -> None:
    lock = RunLock(path)  # held while referenced: the open file is the lock
    lock.acquire()
    ready.set()
    time.sleep(600)


def test_the_lock_of_a_sigkilled_process_is_free_at_once(tmp_path):
    """The kernel releases a dead process's flock: no timeout, no guess."""
    ready = multiprocessing.get_context("fork").Event()
    proc = multiprocessing.get_context("fork").Process(target=_hold, args=(str(tmp_path), ready))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(RunLocked, match=f"pid {proc.pid} on"):
        RunLock(str(tmp_path)).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    RunLock(str(tmp_path)).acquire()


def test_wait_for_lock_waits_for_the_holder_to_end(tmp_path):
    holder = RunLock(str(tmp_path))
    holder.acquire()
    waited = []
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    RunLock(str(tmp_path)).acquire(wait=True, poll_s=0.1, on_wait=waited.append)
    assert time.monotonic() - started >= 0.9 and len(waited) == 1 and "pid" in waited[0]


def test_processes_started_at_the_same_instant_get_exactly_one_lock(tmp_path):
    """Rounds of 4 processes released by one barrier (each spins on a file the test creates once all
    are ready); the holder keeps the lock until the test releases it: each round exactly one holder,
    however slow the machine."""
    code = (
        "import sys, time, pathlib\n"
        "from dino.io.run_lock import RunLock, RunLocked\n"
        "folder, ready, go, release = sys.argv[1:5]\n"
        "lock = RunLock(folder)\n"
        "pathlib.Path(ready).touch()\n"
        "while not pathlib.Path(go).exists(): pass\n"
        "try:\n"
        "    lock.acquire(); print('held', flush=True)\n"
        "    while not pathlib.Path(release).exists(): time.sleep(0.05)\n"
        "except RunLocked: print('refused', flush=True)\n"
    )
    for round_ in range(6):
        folder, go, release = (
            tmp_path / f"round{round_}",
            tmp_path / f"go{round_}",
            tmp_path / f"release{round_}",
        )
        ready = [tmp_path / f"ready{round_}-{i}" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(r), str(go), str(release)],
                                  stdout=subprocess.PIPE, text=True) for r in ready]  # fmt: skip
        deadline = time.time() + 120
        while not all(r.exists() for r in ready) and time.time() < deadline:
            time.sleep(0.05)
        go.touch()
        while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
            time.sleep(0.05)
        release.touch()
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outcomes == ["held", "refused", "refused", "refused"], (round_, outcomes)


# --------------------------------------------------------------------------------------------------
# s3:// (a lease renewed by conditional PUTs)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_run(s3_env, s3_server, request):
    storage.configure(s3_server.endpoint)
    yield f"s3://dinolab-test/locks/{request.node.name}-{time.time_ns()}"
    storage.configure()


def test_s3_second_holder_refused_and_release_frees_it(s3_run):
    with RunLock(s3_run) as first:
        first.acquire()
        with pytest.raises(RunLocked, match="is being trained by another process: pid"):
            RunLock(s3_run).acquire()
    assert not storage.exists(storage.join(s3_run, "LOCK"))
    with RunLock(s3_run) as again:
        again.acquire()


def test_s3_a_lease_is_renewed_and_a_stale_one_taken_over_by_one_contender(s3_run):
    holder = RunLock(s3_run, heartbeat_s=0.2)
    holder.acquire()
    first = json.loads(storage.read_text(storage.join(s3_run, "LOCK")))
    time.sleep(1.0)
    renewed = json.loads(storage.read_text(storage.join(s3_run, "LOCK")))
    assert renewed["token"] == first["token"] and renewed["heartbeat"] > first["heartbeat"]
    # Not stale while renewed, even with a short staleness limit.
    with pytest.raises(RunLocked):
        RunLock(s3_run, stale_after_s=5).acquire()
    lease = holder.backend  # its renewal thread, stopped and restarted by hand
    # The holder vanishes (its renewals stop: a dead node). After stale_after_s, of two contenders
    # exactly one takes the lease over.
    lease._stop.set()
    lease._thread.join()
    time.sleep(1.2)
    contenders = [RunLock(s3_run, heartbeat_s=0.2, stale_after_s=1.0) for _ in range(2)]
    results = []

    def take(lock):
        try:
            lock.acquire()
            results.append("held")
        except RunLocked:
            results.append("refused")

    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["held", "refused"]
    # The old holder comes back: its next renewal fails, so it knows it lost the lock.
    lease._stop.clear()
    lease._thread = threading.Thread(target=lease._renew, daemon=True)
    lease._thread.start()
    deadline = time.time() + 10
    while not lease._lost and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(LockLost, match="was taken over by pid"):
        holder.check()
    holder.release()
    assert storage.exists(storage.join(s3_run, "LOCK"))  # the loser does not delete the winner's lease
    for c in contenders:
        c.release()


def test_describe_says_since_when_and_the_last_renewal():
    text = run_lock.describe({"pid": 7, "host": "n1", "slurm_job_id": "12_3", "since": time.time() - 60,
                              "heartbeat": time.time() - 2})  # fmt: skip
    assert text.startswith("pid 7 on n1, SLURM job 12_3, since ") and "renewed 2 s ago" in text


def test_s3_lease_of_a_dead_process_of_this_machine_is_taken_over_at_once(s3_run, s3_server):
    """A SIGKILL (or an outage) leaves the lease behind; its holder was a process of this machine
    that no longer exists (pid and start time), so it is known dead without waiting 10 minutes."""
    code = (
        "import sys, time\nfrom dino.io import storage\nfrom dino.io.run_lock import RunLock\n"
        f"storage.configure({s3_server.endpoint!r})\n"
        "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, s3_run], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {proc.pid} on"):
        RunLock(s3_run).acquire()  # alive: refused
    proc.kill()
    proc.wait()
    started = time.monotonic()
    with RunLock(s3_run) as lock:
        lock.acquire()
    assert time.monotonic() - started < 10
