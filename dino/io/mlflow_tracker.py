"""`MLflowTracker`: logs from a background thread, so a tracking outage never slows or stops training.

The train loop only appends to an in-memory queue. A sender thread turns the queue into
`log_batch` calls; when the store is unreachable it keeps everything, warns (once a minute) how
much is pending, and retries with backoff until it is back. At exit `close()` waits up to
`tracking.flush_timeout_s`; whatever is still unsent then goes to `<run>/tracking_pending.jsonl`,
which the next tracker on the same run (a requeued job, an evaluation) sends first.

The MLflow side (which run, provenance tags, batching) is dino/io/mlflow_run.py; the run folder's side
(the pending file, the backfill from metrics.jsonl) is dino/io/tracking_spool.py.

One run, one history: on connecting, the tracker asks the store for the last training step it has,
backfills later steps from the run's own `metrics.jsonl` (written synchronously every log step, so
it holds what a killed process logged but never sent), and drops queued steps the store already has
(a resumed run repeats the steps between its checkpoint and the kill, with the same values).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections import deque
from typing import Any

from dino.io import mlflow_store, storage, tracking_spool
from dino.io.mlflow_run import MAX_PARAMS_TAGS, open_run, run_tags, take_batch

log = logging.getLogger("dino.tracking")

WARN_EVERY_S = 60.0


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
            path = tracking_spool.spool(self.run_dir, left)
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
        if now - self._last_warning >= WARN_EVERY_S:
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
        opened = open_run(client, self.uri, self.run_dir, self.experiment, self.run_name, self.training)
        self._known_params, self._watermark = opened.known_params, opened.watermark
        self._client, self.run_id = client, opened.run_id
        spooled = tracking_spool.take_spooled(self.run_dir, self.training)
        backfill = tracking_spool.backfill(self.run_dir, self._watermark) if self.training else []
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
        batch = take_batch(items, self.training, self._watermark, self._known_params)
        param_items = list(batch.params.items())
        for i in range(0, max(len(param_items), 1), MAX_PARAMS_TAGS):  # a config has > 100 keys
            chunk = param_items[i : i + MAX_PARAMS_TAGS]
            with mlflow_store.locked(self.uri):
                self._client.log_batch(
                    self.run_id,
                    metrics=[Metric(k, v, ts, s) for k, v, ts, s in batch.metrics] if i == 0 else [],
                    params=[Param(k, v) for k, v in chunk],
                    tags=run_tags(batch.tags) if i == 0 else [],
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
