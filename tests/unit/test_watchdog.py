"""The progress watchdog (dino/io/watchdog.py): a rank that stops making progress ends the job with its
stacks written and the rank that stopped named; long phases get their allowance. The real frozen
rank under torchrun and on two SLURM nodes: tests/integration/test_hang.py."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dino.io import watchdog
from dino.io.distributed import group_timeout
from dino.run.train_metrics import rank_times


class Exited(Exception):
    pass


def _stuck_in_a_read(release: threading.Event) -> None:
    release.wait(30)  # the main thread's "NFS read": the stacks must show this function


def test_a_stalled_process_writes_its_stacks_names_itself_and_exits_with_the_hung_code(tmp_path):
    hangs, exits = [], []
    done = threading.Event()

    def exit_(code):
        exits.append(code)
        done.set()

    dog = watchdog.Watchdog(str(tmp_path), 0, 1, 1.0, on_hang=hangs.append, exit=exit_, interval_s=0.2)
    dog.start()
    for step in range(1, 6):  # progress: no hang however long this takes in total
        time.sleep(0.3)
        dog.beat(step)
    assert not exits
    started = time.monotonic()
    release = threading.Event()
    worker = threading.Thread(target=_stuck_in_a_read, args=(release,), name="dino-train")
    worker.start()
    assert done.wait(15), "the watchdog never fired"
    took = time.monotonic() - started
    release.set()
    worker.join()
    dog.stop()
    assert exits == [watchdog.HUNG_EXIT_CODE] == [75]
    assert 1.0 <= took < 5.0
    [hang] = hangs
    assert (hang.rank, hang.step, hang.frozen, hang.detected_by) == (0, 5, False, 0)
    assert hang.host == watchdog.node_name() and hang.pid > 0 and hang.stalled_s >= 1.0
    assert "rank 0 on" in hang.message() and "exit code 75" in hang.message()
    health = tmp_path / "health"
    assert json.loads((health / "hang.json").read_text())["rank"] == 0
    [stacks] = list(health.glob("stacks-train-rank0-*.txt"))
    text = stacks.read_text()
    assert "_stuck_in_a_read" in text and "step 5" in text  # every thread, the stuck one included
    beat = json.loads((health / "train-rank0.json").read_text())
    assert beat["step"] == 5 and beat["pid"] == hang.pid


def test_a_long_phase_gets_its_allowance_and_a_zero_timeout_turns_the_watchdog_off(tmp_path):
    exits = []
    dog = watchdog.Watchdog(str(tmp_path), 0, 1, 0.5, exit=exits.append, interval_s=0.1)
    dog.start()
    dog.beat(1)
    with dog.phase("checkpoint"):  # 3 timeouts: 1.5 s
        time.sleep(1.0)
    time.sleep(0.2)
    dog.stop()
    assert exits == []
    off = watchdog.Watchdog(str(tmp_path / "off"), 0, 1, 0.0, exit=exits.append)
    off.start()
    off.beat(3)
    assert off._thread is None and not (tmp_path / "off").exists() and exits == []
    assert group_timeout(0) is None and group_timeout(60).total_seconds() == 120


def _beat(rank, step, phase="step", alive=0.0, progress=0.0, host="n1"):
    """A heartbeat as ages (seconds before the test looks), made into times when the test runs: the
    parameters are built at collection, which may be minutes earlier."""
    return {"rank": rank, "host": host, "pid": 100 + rank, "step": step, "phase": phase,
            "alive_age": alive, "progress_age": progress}  # fmt: skip


@pytest.mark.parametrize(
    ("beats", "suspect", "frozen"),
    [
        # SIGSTOP: its heartbeat thread stopped too, though its step is the same as everyone's
        ({0: _beat(0, 40, progress=70), 1: _beat(1, 40, alive=65, progress=70, host="n2")}, 1, True),
        # all alive: the one waiting for data (a deadlocked loader), not the ones in the collective
        ({0: _beat(0, 40), 1: _beat(1, 40, "data"), 2: _beat(2, 40)}, 1, False),
        ({0: _beat(0, 41), 1: _beat(1, 41), 2: _beat(2, 40, "step")}, 2, False),  # furthest behind
        ({0: _beat(0, 3), 2: _beat(2, 3)}, 1, True),  # never wrote one: it never got this far
    ],
)
def test_the_suspect_is_the_frozen_rank_else_the_one_furthest_behind(tmp_path, beats, suspect, frozen):
    now = time.time()
    beats = {
        r: {**b, "alive_at": now - b["alive_age"], "progress_at": now - b["progress_age"]}
        for r, b in beats.items()
    }
    dog = watchdog.Watchdog(str(tmp_path), 0, 3 if len(beats) != 2 else 2, 60.0, interval_s=10)
    rank, _, was_frozen = dog.find_suspect(beats, now)
    assert (rank, was_frozen) == (suspect, frozen)


def test_rank_times_compare_the_slowest_rank_with_the_median_of_the_others():
    two = rank_times([0.10, 0.30])
    assert two["slowest_rank"] == 1 and two["straggler_ratio"] == pytest.approx(3.0)
    assert two["rank_step_s_max"] == 0.30 and two["rank_step_s_median"] == pytest.approx(0.20)
    four = rank_times([0.1, 0.1, 0.12, 0.1])
    assert four["slowest_rank"] == 2 and four["straggler_ratio"] == pytest.approx(1.2)
