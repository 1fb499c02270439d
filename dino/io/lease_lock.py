"""The run lock on an object store (s3://), which has no locks: a lease object `<run.dir>/LOCK` that
the holder keeps alive. The entry point is `dino.io.run_lock.RunLock`, which picks this backend.

The lease is one small JSON object read with its version (ETag) and replaced only on a condition
(create if absent, or If-Match a version), so that of two processes racing for it exactly one wins.
The holder rewrites it every `heartbeat_s` with a conditional PUT (If-Match its own version).
Another process takes over only a lease not renewed for `stale_after_s` (default 10 minutes, many
heartbeats), or one whose holder was a process of this very machine that no longer exists (pid and
start time), and only with a conditional PUT on the exact version it judged stale: of two contenders
one wins. A holder whose renewal fails because another took over has lost the lock: `check()` raises
`LockLost` and the train loop stops before it writes again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

from dino.io import storage

log = logging.getLogger("dino.lock")


class LockLost(RuntimeError):
    """This process's lease on a remote run folder was taken over: it must not write again."""


class HolderRules(Protocol):
    """Who a holder is (dino.io.run_lock.Holder): passed in, so this module needs nothing of run_lock."""

    def mine(self) -> dict[str, Any]: ...
    def dead_on_this_host(self, holder: dict[str, Any]) -> bool: ...
    def describe(self, holder: dict[str, Any]) -> str: ...


class LeaseLock:
    """One backend of `dino.io.run_lock.RunLock`: try once, check, release."""

    def __init__(
        self, run_dir: str, path: str, heartbeat_s: float, stale_after_s: float, holders: HolderRules
    ) -> None:
        self.run_dir, self.path, self.holders = run_dir, path, holders
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._etag = ""
        self._holder: dict[str, Any] = {}
        self._lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> dict[str, Any] | None:
        """None when this process now holds the lease (renewed from now on), else the holder's
        description."""
        storage.makedirs(self.run_dir)
        holder = self.holders.mine() | {"heartbeat": time.time()}
        etag = _put_lease(self.path, holder, mode="create")
        if etag is None:
            current, current_etag = _read_lease(self.path)
            if not current_etag:
                return self.try_acquire()  # released between the two calls: try again
            age = time.time() - float(current.get("heartbeat", 0) or 0)
            if age < self.stale_after_s and not self.holders.dead_on_this_host(current):
                return current
            # Not renewed for stale_after_s (many heartbeats): the holder is gone. Take over exactly
            # that version; a contender that took it first makes this PUT fail.
            etag = _put_lease(self.path, holder, IfMatch=current_etag)
            if etag is None:
                return _read_lease(self.path)[0]
            why = f"not renewed for {age:.0f} s" if age >= self.stale_after_s else "that process has ended"
            log.warning(
                "took over the lock of %s from %s: %s", self.run_dir, self.holders.describe(current), why
            )
        self._holder, self._etag = holder, etag
        self._thread = threading.Thread(target=self._renew, name="dino-lock", daemon=True)
        self._thread.start()
        return None

    def check(self) -> None:
        """Raise LockLost if the lease was taken over (call before each write)."""
        if self._lost:
            raise LockLost(self._lost)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._etag and not self._lost:
            try:
                if _read_lease(self.path)[1] == self._etag:  # still ours (a taken-over lease is not)
                    storage.remove(self.path)
            except Exception as err:  # noqa: BLE001 - an outage: the lease then expires by itself
                log.warning("could not remove the lock %s (it expires unrenewed): %s", self.path, err)
            self._etag = ""

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._holder["heartbeat"] = time.time()
            try:
                etag = _put_lease(self.path, self._holder, IfMatch=self._etag)
            except Exception as err:  # noqa: BLE001 - an outage: try again next beat
                log.warning("could not renew the lock %s: %s", self.path, err)
                continue
            if etag is None:
                current, _ = _read_lease(self.path)
                self._lost = (
                    f"the lock of {self.run_dir} was taken over by {self.holders.describe(current)} (this process's lease "
                    f"was not renewed in time); stopping without writing"
                )
                log.error("%s", self._lost)
                return
            self._etag = etag


# ---- the lease object: conditional PUTs ------------------------------------------------------------
def _read_lease(path: str) -> tuple[dict[str, Any], str]:
    """(lease content, its ETag); ({}, "") when there is none."""
    fs, p = storage.filesystem(path)
    try:
        info = fs.info(p)
        data = fs.cat_file(p)
    except FileNotFoundError:
        return {}, ""
    try:
        content = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        content = {}
    return content, info.get("ETag", "")


def _put_lease(path: str, content: dict[str, Any], **condition: str) -> str | None:
    """Conditional PUT of the lease (`mode="create"`, or `IfMatch=etag`); its new ETag, or None when
    the condition failed."""
    fs, p = storage.filesystem(path)
    try:
        out = fs.pipe_file(p, json.dumps(content).encode(), **condition)
    except FileExistsError:  # s3fs's mapping of a failed If-None-Match
        return None
    except OSError as err:
        if _condition_failed(err):
            return None
        raise
    etag = (out or {}).get("ETag") if isinstance(out, dict) else None
    return etag or _read_lease(path)[1]


def _condition_failed(err: BaseException | None) -> bool:
    """Whether an S3 error (or what it wraps: s3fs turns botocore's ClientError into OSError) is a
    failed condition: 412 PreconditionFailed, or 409 ConditionalRequestConflict (a race on the key)."""
    while err is not None:
        code = (
            getattr(err, "response", {}).get("Error", {}).get("Code", "") if hasattr(err, "response") else ""
        )
        if code in (
            "PreconditionFailed",
            "ConditionalRequestConflict",
        ) or "pre-conditions you specified" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
