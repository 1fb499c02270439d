"""The progress watchdog: a job whose rank stops making progress stops holding its allocation.

Every rank of a pretraining or evaluation job beats a heartbeat at each step (`beat`); long phases
(start-up, the first step with its compile, a checkpoint save, the k-NN monitor, feature extraction)
get their own allowance (`phase`). A daemon thread per rank keeps this rank's heartbeat file
current in the run folder (`health/<job>-rank<r>.json`: step, phase, last progress, and `alive_at`,
which only a running process refreshes). When this rank has made no progress for its allowance
(`train.hang_timeout_s`) it looks at every rank's file to find the one that stopped:

- a rank whose `alive_at` is stale is frozen (a stopped or wedged process: SIGSTOP, a hung NFS read
  in the kernel, a dead node) and is the suspect;
- otherwise the rank furthest behind (lowest step, then one outside a collective, then the oldest
  progress) is: a deadlocked loader, a rank that never reached the collective the others wait in.

Then every rank that can still run writes its Python stacks (faulthandler, all threads) into
`health/`, the lowest live rank also a `py-spy dump` of a frozen suspect on the same node (when
py-spy is installed), writes `health/hang.json`, logs one line naming the rank and host, and calls
`on_hang` (the launcher records `hung` and requeues the job without that node); then the process
exits with `HUNG_EXIT_CODE`, whatever the main thread is blocked in. Under plain torchrun the exit
code is the signal: torchrun stops the other workers and reports it.

Why files and not a collective: the rank that stopped cannot answer one, and every live rank is
stuck in the collective it is waiting in; the run folder is already shared by every node
(dino/run/loop.py refuses node-local run folders).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from dino.io import storage

log = logging.getLogger("dino.health")

HUNG_EXIT_CODE = 75
"""The exit code of a process the watchdog stopped (sysexits' EX_TEMPFAIL: try again later)."""
HEALTH_DIR = "health"
HANG_FILE = "hang.json"
# A phase that may legitimately take longer than a step gets this many timeouts: a compile on the
# first step, a checkpoint written to a slow store, the k-NN monitor's feature pass.
LONG_PHASE = 3.0
# The collective a rank waits in while another one is late: a rank in it is a victim, not a suspect.
COLLECTIVE_PHASES = ("step", "checkpoint", "end")


_active: Watchdog | None = None  # the watchdog of this process's job, for `progress()`


def progress() -> None:
    """Progress inside a long phase of this process's job (a batch of features, a probe batch): the
    clock starts again, the phase and its allowance stay. Nothing when no watchdog runs."""
    if _active is not None:
        _active._progress, _active._progress_wall = time.monotonic(), time.time()


def node_name() -> str:
    """The node as the scheduler names it (what `--exclude` takes): SLURM's name for the node when
    running under SLURM (several slurmd on one machine share its hostname), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def health_dir(run_dir: str) -> str:
    return storage.join(run_dir, HEALTH_DIR)


@dataclass
class Hang:
    """What the watchdog found: the rank that stopped, and what was written about it."""

    rank: int
    host: str
    pid: int
    step: int
    phase: str
    frozen: bool
    """Its process stopped running (its heartbeat thread too), not only its progress."""
    stalled_s: float
    """Seconds since the suspect's last progress, when it was found."""
    detected_by: int
    detected_on: str
    detected_at: float
    job: str
    stacks: list[str] = field(default_factory=list)
    """The files written under health/ (every live rank's stacks, a py-spy dump)."""

    def message(self) -> str:
        how = "its process stopped running" if self.frozen else "its process runs but makes no progress"
        return (
            f"hung: rank {self.rank} on {self.host} (pid {self.pid}) made no progress for {self.stalled_s:.0f} s "
            f"(last heartbeat at step {self.step}, in {self.phase}; {how}); stacks in {HEALTH_DIR}/; "
            f"stopping with exit code {HUNG_EXIT_CODE}"
        )


def read_hang(run_dir: str) -> dict | None:
    """The newest hang.json of the run (None: it never hung)."""
    return storage.read_json(storage.join(health_dir(run_dir), HANG_FILE))


class Watchdog:
    """One rank's heartbeat and hang detection; `timeout_s` 0 turns it off (beats cost nothing then).

    `beat(step)` is called by the loop after every step and only sets two attributes; the thread
    does the file writes. `on_hang(hang)` runs on the lowest live rank before the exit; `exit` is
    `os._exit` (the main thread may be blocked in a collective that never returns)."""

    def __init__(
        self,
        run_dir: str,
        rank: int,
        world_size: int,
        timeout_s: float,
        *,
        job: str = "train",
        on_hang: Callable[[Hang], None] | None = None,
        exit: Callable[[int], None] = os._exit,
        interval_s: float | None = None,
    ) -> None:
        self.run_dir, self.rank, self.world_size, self.timeout_s = run_dir, rank, world_size, timeout_s
        self.job, self.on_hang, self._exit = job, on_hang, exit
        self.interval_s = interval_s if interval_s is not None else min(10.0, max(0.5, timeout_s / 6))
        self.host, self.pid = node_name(), os.getpid()
        self.step, self.phase_name = 0, "start"
        self.allowance_s = LONG_PHASE * timeout_s
        self._progress = time.monotonic()
        self._progress_wall = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hang: Hang | None = None

    @property
    def stale_after_s(self) -> float:
        """A heartbeat file older than this belongs to a process that stopped running: three missed
        writes and a few seconds of clock skew between nodes, and less than the timeout, so a rank
        frozen when the others stalled is already stale when they look."""
        return min(3 * self.interval_s + 5.0, self.timeout_s / 2)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> Watchdog:
        global _active
        if self.enabled and self._thread is None:
            _active = self
            storage.makedirs(health_dir(self.run_dir))
            self._write()
            self._thread = threading.Thread(target=self._watch, name=f"dino-watchdog-{self.job}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def beat(self, step: int | None = None, phase: str = "step") -> None:
        """Progress: a step finished (or a unit of a long phase). Back to the normal allowance."""
        if step is not None:
            self.step = step
        self.phase_name, self.allowance_s = phase, self.timeout_s
        self._progress, self._progress_wall = time.monotonic(), time.time()

    def waiting(self, phase: str) -> None:
        """Name what this rank does now, without counting it as progress (`data`: waiting for a
        batch, outside any collective; `step`: inside the step's collectives)."""
        self.phase_name = phase

    @contextmanager
    def phase(self, name: str, allowance_s: float | None = None) -> Iterator[None]:
        """A long phase: `allowance_s` (default LONG_PHASE timeouts; None-like 0 or less: no limit)
        from its start, then a beat when it ends."""
        previous = self.phase_name
        self.phase_name = name
        self.allowance_s = LONG_PHASE * self.timeout_s if allowance_s is None else allowance_s
        self._progress, self._progress_wall = time.monotonic(), time.time()
        try:
            yield
        finally:
            self.beat(phase=previous if previous != "start" else "step")

    # -- the thread ---------------------------------------------------------------------------------

    def _heartbeat(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step, "phase": self.phase_name,
                "progress_at": self._progress_wall, "alive_at": time.time(), "interval_s": self.interval_s,
                "timeout_s": self.timeout_s}  # fmt: skip

    def _file(self, rank: int) -> str:
        return storage.join(health_dir(self.run_dir), f"{self.job}-rank{rank}.json")

    def _write(self) -> None:
        try:
            storage.atomic_write_text(self._file(self.rank), json.dumps(self._heartbeat()))
        except storage.StorageError as err:  # a store outage must not stop training; the next beat retries
            log.debug("heartbeat not written: %s", err)

    def _watch(self) -> None:
        tick = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if now - tick > 2 * self.interval_s + 5.0:
                # This process was itself stopped (SIGSTOP, then SIGCONT as SLURM tears the job down):
                # it is the rank the others reported, not a judge of them. A fresh allowance.
                log.warning("this process did not run for %.0f s (stopped?)", now - tick - self.interval_s)
                self._progress = now
            tick = now
            self._write()
            stalled = now - self._progress
            if self.allowance_s > 0 and stalled > self.allowance_s:
                self._stopped(stalled)
                return

    def _read_all(self) -> dict[int, dict]:
        found = {}
        for rank in range(self.world_size):
            try:
                found[rank] = json.loads(storage.read_text(self._file(rank)))
            except (OSError, json.JSONDecodeError, storage.StorageError):
                continue
        return found

    def find_suspect(self, beats: dict[int, dict], now: float) -> tuple[int, dict, bool]:
        """(rank, its heartbeat, frozen) of the rank that stopped; see the module docstring."""
        stale_after = self.stale_after_s
        missing = [r for r in range(self.world_size) if r not in beats]
        if missing:  # never wrote a heartbeat: it never got this far
            return missing[0], {"rank": missing[0], "host": "?", "pid": 0, "step": -1, "phase": "start",
                                "progress_at": 0.0}, True  # fmt: skip
        frozen = [r for r, b in beats.items() if r != self.rank and now - b["alive_at"] > stale_after]
        if frozen:
            rank = min(frozen, key=lambda r: beats[r]["alive_at"])
            return rank, beats[rank], True

        def behind(r: int) -> tuple:
            b = beats[r]
            return (b["step"], b["phase"] in COLLECTIVE_PHASES, b["progress_at"])

        rank = min(beats, key=behind)
        return rank, beats[rank], False

    def _stopped(self, stalled: float) -> None:
        now = time.time()
        beats = self._read_all()
        beats[self.rank] = self._heartbeat()
        rank, beat, frozen = self.find_suspect(beats, now)
        live = [r for r in beats if r != rank and now - beats[r]["alive_at"] <= self.stale_after_s]
        leader = min(live or [self.rank]) == self.rank
        self._dump_stacks()
        hang = Hang(rank=rank, host=beat.get("host", "?"), pid=beat.get("pid", 0), step=beat.get("step", -1),
                    phase=beat.get("phase", "?"), frozen=frozen,
                    stalled_s=round(now - beat.get("progress_at", now - stalled), 1),
                    detected_by=self.rank, detected_on=self.host, detected_at=now, job=self.job)  # fmt: skip
        if leader:
            if frozen and hang.host == self.host:
                self._py_spy(hang.pid, rank)
            time.sleep(min(5.0, 2 * self.interval_s))  # the other live ranks' stacks land first
            hang.stacks = sorted(
                p for p in storage.listdir(health_dir(self.run_dir)) if p.endswith(".txt") and self.job in p
            )
            self.hang = hang
            try:
                storage.atomic_write_text(storage.join(health_dir(self.run_dir), HANG_FILE),
                                          json.dumps(asdict(hang), indent=1))  # fmt: skip
            except storage.StorageError as err:
                log.error("hang.json not written: %s", err)
            log.error("%s", hang.message())
            if self.on_hang is not None:
                try:
                    self.on_hang(hang)
                except Exception:  # noqa: BLE001 - the exit below must happen whatever the launcher does
                    log.exception("the hang handler failed")
        else:  # the leader reports; give it time before this exit makes torchrun/srun end the job
            self.hang = hang
            log.error("hung: rank %d stopped making progress; rank %d reports it", rank, min(live))
            time.sleep(min(30.0, 4 * self.interval_s + 5))
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(HUNG_EXIT_CODE)

    def _dump_stacks(self) -> str:
        """Every thread's Python stack of this process into health/ (faulthandler needs a real file:
        written locally, then copied, so an s3:// run folder works too)."""
        name = f"stacks-{self.job}-rank{self.rank}-{self.host}.txt"
        with tempfile.TemporaryFile("w+") as handle:
            handle.write(f"# rank {self.rank} on {self.host}, pid {self.pid}, step {self.step}, "
                         f"phase {self.phase_name}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")  # fmt: skip
            handle.flush()
            faulthandler.dump_traceback(handle, all_threads=True)
            handle.seek(0)
            text = handle.read()
        try:
            storage.atomic_write_text(storage.join(health_dir(self.run_dir), name), text)
        except storage.StorageError as err:
            log.error("stacks not written: %s", err)
        return name

    def _py_spy(self, pid: int, rank: int) -> str:
        """The frozen process's stacks, read from outside by py-spy (nonblocking: a stopped process
        cannot be paused again); "" when py-spy is not installed or cannot read it."""
        tool = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if tool is None or not pid:
            return ""
        try:
            done = subprocess.run([tool, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                                  text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("py-spy could not read pid %d: %s", pid, err)
            return ""
        name = f"py-spy-{self.job}-rank{rank}.txt"
        storage.atomic_write_text(storage.join(health_dir(self.run_dir), name), done.stdout + done.stderr)
        return name
