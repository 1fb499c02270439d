"""`MLflowTracker`: logs from a background thread, so a tracking outage never slows or stops training;
with the run it opens, the batches it sends, the spool of what it could not send, and the factories.

The train loop only appends to an in-memory queue. A sender thread turns the queue into
`log_batch` calls (within MLflow's limits); when the store is unreachable it keeps everything, warns
(once a minute) how much is pending, and retries with backoff until it is back. At exit `close()`
waits up to `tracking.flush_timeout_s`; whatever is still unsent then goes to
`<run>/tracking_pending.jsonl`, which the next tracker on the same run (a requeued job, an
evaluation) sends first.

One run, one history: on connecting, the tracker opens the run tied to the folder (tracking.json,
dino/io/tracking.py) or a new one with provenance tags (host, SLURM job, git commit), asks the store
for the last training step it has, backfills later steps from the run's own `metrics.jsonl` (written
synchronously every log step, so it holds what a killed process logged but never sent), and drops
queued steps the store already has (a resumed run repeats the steps between its checkpoint and the
kill, with the same values). Every MLflow client comes from dino/io/mlflow_store.py.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino.config.schema import DinoConfig
from dino.io import mlflow_store, storage
from dino.io.tracking import NullTracker, Tracker, read_link, write_link

log = logging.getLogger("dino.tracking")

_WARN_EVERY_S = 60.0

# ---- the MLflow run: which run, provenance, batches within MLflow's limits ------------------------
_PROGRESS_KEY = "loss"  # every training log step logs it; its last step is the store's watermark
_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # MLflow's log_batch limits


def _git_commit() -> str:
    """The commit of the dinolab source tree this process runs ("" when it is not a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _provenance_tags() -> dict[str, str]:
    """Where this process runs: host, SLURM job, git commit."""
    tags = {"dinolab.host": socket.gethostname(), "dinolab.git_commit": _git_commit()}
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job:
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    job = job or os.environ.get("SLURM_JOB_ID", "")
    if job:
        tags["dinolab.slurm_job_id"] = job
    return {k: v for k, v in tags.items() if v}


@dataclass
class _OpenedRun:
    """A run ready to log to: its id, the params it already has and the last training step it has."""

    run_id: str
    known_params: dict[str, str]
    watermark: int


def _open_run(
    client: Any, uri: str, run_dir: str, experiment: str, run_name: str, training: bool
) -> _OpenedRun:
    """The run tied to `run_dir` by tracking.json (else a new one, linked); a training start also
    counts itself (`dinolab.starts`, `dinolab.requeues`), tags where it runs and marks it RUNNING."""
    link = read_link(run_dir)
    run = None
    if link and link["uri"] == uri:
        try:
            run = client.get_run(link["run_id"])
        except Exception as err:
            if not mlflow_store.is_permanent(err):
                raise
            log.warning("MLflow run %s of %s is gone (%s); starting a new one", link["run_id"],
                        run_dir, str(err).splitlines()[0][:200])  # fmt: skip
    if run is None:
        experiment_id = mlflow_store.ensure_experiment(client, uri, experiment)
        run_id = mlflow_store.create_run(client, uri, experiment_id, run_name, {"dinolab.kind": "run"})
        write_link(run_dir, uri, experiment_id, run_id)
        run = client.get_run(run_id)
    run_id = run.info.run_id
    history = client.get_metric_history(run_id, _PROGRESS_KEY)
    opened = _OpenedRun(run_id, dict(run.data.params), max((m.step for m in history), default=-1))
    with mlflow_store.locked(uri):
        if training:
            starts = int(run.data.tags.get("dinolab.starts", "0")) + 1
            tags = {
                **_provenance_tags(),
                "dinolab.starts": str(starts),
                "dinolab.requeues": str(starts - 1),
            }
            job = tags.get("dinolab.slurm_job_id")
            if job:
                jobs = [j for j in run.data.tags.get("dinolab.slurm_job_ids", "").split(",") if j]
                tags["dinolab.slurm_job_ids"] = ",".join(dict.fromkeys([*jobs, job]))
            client.log_batch(run_id, tags=_run_tags(tags))
            client.update_run(run_id, status="RUNNING")
    return opened


@dataclass
class _Batch:
    """Consecutive queued metrics/params/tags updates merged into one `log_batch`."""

    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    taken: int = 0  # queued items it holds
    mark: int = -1  # the watermark once it is sent


def _take_batch(
    items: list[tuple[str, Any]], training: bool, watermark: int, known_params: dict[str, str]
) -> _Batch:
    """The longest run of metrics/params/tags items at the head of `items` that fits MLflow's limits;
    training steps the store already has (at or below the watermark) and params it has are left out."""
    # `mark` moves through the batch too: a backfilled step and the same step logged again by
    # the resumed loop can meet in one batch.
    batch = _Batch(mark=watermark)
    for kind, value in items:
        if kind == "metrics":
            fresh = [m for m in value if not training or m[3] > batch.mark]
            if batch.metrics and len(batch.metrics) + len(fresh) > _MAX_METRICS:
                break
            batch.metrics += fresh
            if training:
                batch.mark = max([batch.mark, *(m[3] for m in fresh)])
        elif kind == "params":
            new = {k: v for k, v in value.items() if k not in known_params}
            full = len(batch.params) + len(new) + len(batch.tags) > _MAX_PARAMS_TAGS
            if full and (batch.params or batch.tags or batch.metrics):
                break
            batch.params.update(new)
        elif kind == "tags":
            full = len(batch.params) + len(batch.tags) + len(value) > _MAX_PARAMS_TAGS
            if full and (batch.params or batch.tags or batch.metrics):
                break
            batch.tags.update(value)
        else:
            break
        batch.taken += 1
    return batch


def _run_tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


# ---- the spool: the run folder's side of tracking ------------------------------------------------
# `<run>/tracking_pending.jsonl` holds what `MLflowTracker.close` could not send in time (the store
# was down); the next tracker on the same run sends it first. `metrics.jsonl` holds what a killed
# process logged but never sent: `_backfill` reads back the steps the store does not have.

PENDING = "tracking_pending.jsonl"


def _spool(run_dir: str, items: list[tuple[str, Any]]) -> str:
    """Add queued updates to the run's pending file; returns its path."""
    path = storage.join(run_dir, PENDING)
    lines = "".join(json.dumps({"kind": kind, "value": value}) + "\n" for kind, value in items)
    old = storage.read_text(path) if storage.exists(path) else ""
    storage.atomic_write_text(path, old + lines)  # whole-file write: object stores cannot append
    return path


def _take_spooled(run_dir: str, training: bool) -> list[tuple[str, Any]]:
    """The run's pending updates, removing the file (they are in the caller's queue now; a failure
    spools them again at close). A training job drops spooled statuses: it sets its own."""
    path = storage.join(run_dir, PENDING)
    if not storage.exists(path):
        return []
    items = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    storage.remove(path)
    return [(i["kind"], i["value"]) for i in items if i["kind"] != "status" or not training]


def _backfill(run_dir: str, watermark: int) -> list[tuple[str, Any]]:
    """Training steps in metrics.jsonl after `watermark` (the last step the store has), as queued
    metrics updates."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    rows: dict[int, dict[str, float]] = {}
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if row.get("step", -1) > watermark:
            rows[int(row["step"])] = row
    now = int(time.time() * 1000)
    return [
        ("metrics", [(k, float(v), now, step) for k, v in row.items() if k != "step"])
        for step, row in sorted(rows.items())
    ]


class MLflowTracker:
    """Tracker on one MLflow run: the run tied to `run_dir` by tracking.json, else a new one."""

    def __init__(
        self,
        uri: str,
        run_dir: str,
        experiment: str = "dinolab",
        run_name: str = "",
        flush_timeout_s: float = 60.0,
        training: bool = True,
    ) -> None:
        self.uri, self.run_dir, self.experiment = uri, run_dir, experiment
        self.run_name = run_name or os.path.basename(run_dir.rstrip("/"))
        self.flush_timeout_s, self.training = flush_timeout_s, training
        self.run_id: str | None = None
        self._client: Any = None
        self._known_params: dict[str, str] = {}
        self._watermark = -1  # last training step the store has
        self._items: deque[tuple[str, Any]] = deque()
        self._copies: set[str] = set()  # local copies of remote artifacts, removed once uploaded
        self._cond = threading.Condition()
        self._closing = self._abandoned = False
        self._failing_since: float | None = None
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._send_loop, name="dinolab-tracking", daemon=True)
        self._thread.start()

    # -- the Tracker interface: enqueue only ------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._put("params", {k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._put("metrics", [(k, float(v), now, int(step)) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put("tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str, artifact_path: str = "") -> None:
        # A remote file (run folder on s3://) is read now, in the caller's thread, into a local copy:
        # MLflow uploads from local files, and the copy is what the file was when it was logged.
        if storage.is_remote(path):
            folder = tempfile.mkdtemp(prefix="dinolab-artifact-")
            local = os.path.join(folder, posixpath.basename(path))
            with open(local, "wb") as f:
                f.write(storage.read_bytes(path))
            path = local
            self._copies.add(os.path.abspath(path))
        self._put("artifact", [os.path.abspath(path), artifact_path])

    def finish(self, status: str = "FINISHED") -> None:
        """Set the run's status (a run that only holds evaluations: a weights file's)."""
        self._put("status", status)

    def close(self, status: str = "FINISHED") -> None:
        """Send the final status (training only: an evaluation leaves the run's status alone); wait
        up to flush_timeout_s, then spool what is left to disk."""
        if self.training:
            self._put("status", status)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.flush_timeout_s)
        with self._cond:
            self._abandoned = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        if left:
            path = _spool(self.run_dir, left)
            log.warning(
                "tracking store %s unreachable for %.0f s: %d pending update(s) written to %s; "
                "the next job or evaluation of this run sends them",
                self.uri, self.flush_timeout_s, len(left), path,
            )  # fmt: skip

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything queued so far is sent (tests, evaluations); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._items and time.monotonic() < deadline:
                self._cond.wait(0.1)
            return not self._items

    def _put(self, kind: str, value: Any) -> None:
        with self._cond:
            if self._abandoned:
                return
            self._items.append((kind, value))
            self._cond.notify_all()

    # -- the sender thread --------------------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if self._abandoned or (self._closing and not self._items):
                    return
            try:
                if self.run_id is None:
                    self._connect()
                self._send_head()
            except Exception as err:  # noqa: BLE001 - an outage must never reach the train loop
                if self.run_id is not None and mlflow_store.is_permanent(err):
                    self._drop_head(err)
                    continue
                self._warn(err)
                with self._cond:
                    self._cond.wait(backoff)  # close() wakes it for one more try
                backoff = min(2 * backoff, 10.0)
                continue
            if self._failing_since is not None:
                log.warning("tracking store %s reachable again; pending updates sent", self.uri)
                self._failing_since = None
            backoff = 1.0

    def _warn(self, err: BaseException) -> None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            with self._cond:
                pending = sum(len(v) if kind == "metrics" else 1 for kind, v in self._items)
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            log.warning(
                "tracking store %s unreachable (%s): %d value(s) pending, retrying; training goes on",
                self.uri, first_line, pending,
            )  # fmt: skip

    def _drop_head(self, err: BaseException) -> None:
        with self._cond:
            kind, _ = self._items.popleft()
            self._cond.notify_all()
        log.warning("tracking store refused a %s update, dropped: %s", kind, str(err).splitlines()[0][:300])

    def _connect(self) -> None:
        """Open the run (tracking.json's, or a new one), replay spooled updates, set the watermark."""
        client = mlflow_store.client(self.uri)
        opened = _open_run(client, self.uri, self.run_dir, self.experiment, self.run_name, self.training)
        self._known_params, self._watermark = opened.known_params, opened.watermark
        self._client, self.run_id = client, opened.run_id
        spooled = _take_spooled(self.run_dir, self.training)
        backfill = _backfill(self.run_dir, self._watermark) if self.training else []
        with self._cond:
            self._items.extendleft(reversed(spooled + backfill))
        log.info(
            "tracking: MLflow run %s in %s (store has steps up to %d)", self.run_id, self.uri, self._watermark
        )

    def _send_head(self) -> None:
        """Send the oldest queued updates: consecutive metrics/params/tags in one log_batch."""
        from mlflow.entities import Metric, Param

        with self._cond:
            items = list(self._items)
        if not items:
            return
        kind, value = items[0]
        if kind == "artifact":
            self._client.log_artifact(self.run_id, value[0], value[1] or None)
            if value[0] in self._copies:  # uploaded: the local copy of a remote file goes (a spooled
                self._copies.discard(value[0])  # one stays for the process that sends it)
                shutil.rmtree(os.path.dirname(value[0]), ignore_errors=True)
            return self._pop(1)
        if kind == "status":
            with mlflow_store.locked(self.uri):
                self._client.set_terminated(self.run_id, value)
            return self._pop(1)
        batch = _take_batch(items, self.training, self._watermark, self._known_params)
        param_items = list(batch.params.items())
        for i in range(0, max(len(param_items), 1), _MAX_PARAMS_TAGS):  # a config has > 100 keys
            chunk = param_items[i : i + _MAX_PARAMS_TAGS]
            with mlflow_store.locked(self.uri):
                self._client.log_batch(
                    self.run_id,
                    metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch.metrics] if i == 0 else [],
                    params=[Param(k, v) for k, v in chunk],
                    tags=_run_tags(batch.tags) if i == 0 else [],
                )
            self._known_params.update(chunk)
            self._watermark = batch.mark  # sent: a retry of a later chunk must not repeat the metrics
        self._pop(batch.taken)

    def _pop(self, n: int) -> None:
        with self._cond:
            for _ in range(n):
                if self._items:
                    self._items.popleft()
            self._cond.notify_all()


def build_tracker(cfg: DinoConfig, is_main: bool) -> Tracker:
    """The training tracker of this process: MLflow on rank 0 when `tracking.uri` is set."""
    if not is_main or not cfg.tracking.uri:
        return NullTracker()
    return MLflowTracker(
        cfg.tracking.uri,
        cfg.run.dir,
        experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name,
        flush_timeout_s=cfg.tracking.flush_timeout_s,
        training=True,
    )


def open_run_tracker(run_dir: str, flush_timeout_s: float = 60.0) -> Tracker:
    """A tracker on the MLflow run already tied to `run_dir` (evaluations log there); NullTracker
    when the run is not tracked."""
    link = read_link(run_dir)
    if link is None:
        return NullTracker()
    return MLflowTracker(link["uri"], run_dir, flush_timeout_s=flush_timeout_s, training=False)
