"""The one module that touches files: local paths and fsspec URLs (s3://...) behind one small API,
with its local half and its errors.

Publishing: `atomic_write_bytes` makes readers see the old content or the complete new one: locally
a temporary name in the same folder, then a rename; on an object store a single PUT, which the store
makes visible only once complete. Multi-file objects (checkpoints) write their parts first and a
marker object last (see `dino.io.checkpoint`). Local appends are whole or nothing (cut back when they
fail part way) and a partial last line is cut on opening: a full disk is a `WriteError`, with nothing
half-written left behind.

Object stores (options, endpoint, retries, and errors that say whether credentials, the bucket or
the endpoint is wrong) are dino/io/object_store.py; `configure` sets their options from the config.
`StorageError` is defined there (most of its causes are the store's) and is part of this API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

from dino.io import object_store

# The errors every function here raises, part of this module's API (callers catch storage.StorageError).
from dino.io.object_store import StorageError as StorageError

log = logging.getLogger("dino.storage")  # one logger for all storage messages, local or remote


class WriteError(StorageError):
    """A local file that could not be written (no space left, quota, read-only file system); nothing
    half-written is left behind: temporary files are removed and appends are cut back."""


def _write_error(path: str, err: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {err.strerror or err}")


T = TypeVar("T")
_LOCAL = fsspec.filesystem("file")
# Non-secret object-store options from the config (`storage.endpoint_url`, `storage.region`).
configure = object_store.configure


def _local(path: str) -> str:
    """A local path as fsspec reads it (file:// dropped, ~ expanded)."""
    return os.path.expanduser(path.removeprefix("file://"))


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if not is_remote(path):
        # url_to_fs parses the URL and looks the file system up on every call: a tenth of a
        # millisecond that `sweep status` paid thousands of times on a 1,000-run sweep.
        return _LOCAL, _LOCAL._strip_protocol(path)
    return object_store.remote_fs(path)


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, path within it) with dinolab's options, for what this module's small API
    does not cover (the run lock's conditional PUTs)."""
    return _fs(path)


def _call(what: str, path: str, fn: Callable[[], T]) -> T:
    """Run one storage operation: as is on a local path, through the object store's retries and
    errors on a remote one."""
    return object_store.call(what, path, fn) if is_remote(path) else fn()


def _check_bucket(path: str) -> None:
    if is_remote(path):
        object_store.check_bucket(path)


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if "://" in path else os.path.dirname(path)


# Local paths skip fsspec in the three calls `sweep status` makes thousands of times (fsspec's
# local file system normalises each path again: a third of the status of 1,000 runs).


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, p = _fs(path)
    return _call("look up", path, lambda: fs.exists(p))


def isdir(path: str) -> bool:
    fs, p = _fs(path)
    return _call("look up", path, lambda: fs.isdir(p))


def makedirs(path: str) -> None:
    """Create a local folder; on object stores (no folders) check that the bucket exists."""
    if is_remote(path):
        _check_bucket(path)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Base names of the entries directly under `path` (empty when it does not exist)."""
    if not is_remote(path):
        local = _local(path)
        return sorted(os.listdir(local)) if os.path.isdir(local) else []
    fs, p = _fs(path)

    def names() -> list[str]:
        if not fs.exists(p):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))

    return _call("list", path, names)


def find(path: str) -> list[str]:
    """Paths of every file under `path`, relative to it, sorted: one recursive listing (on an object
    store a few paginated LIST requests instead of one per folder)."""
    fs, p = _fs(path)
    prefix = p.rstrip("/") + "/"
    return sorted(f[len(prefix) :] for f in _call("list", path, lambda: fs.find(p)) if f.startswith(prefix))


def open_file(path: str, mode: str = "rb") -> IO:
    fs, p = _fs(path)
    if "r" not in mode:
        _check_bucket(path)
    return _call("open", path, lambda: fs.open(p, mode))


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(_local(path), "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return _call("read", path, lambda: fs.cat_file(p))


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str, default: Any = None) -> Any:
    """The JSON a small state file holds (a record, hang.json), or `default` when the file is absent,
    unreadable or not JSON (a reader never stops on another process's state file)."""
    if not exists(path):
        return default
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, OSError):
        return default


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` so that readers see either the old content or the complete new one."""
    fs, p = _fs(path)
    if is_remote(path):
        _check_bucket(path)
        _call("write", path, lambda: fs.pipe_file(p, data))  # one PUT: visible only once complete
        return
    _atomic_write(p, data, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove(path: str) -> None:
    """Remove a file or a whole folder; missing paths are fine."""
    fs, p = _fs(path)

    def rm() -> None:
        if fs.exists(p):
            fs.rm(p, recursive=True)

    _call("remove", path, rm)


def upload_file(local_path: str, path: str) -> None:
    """Copy a local file to `path` atomically (local or remote)."""
    with open(local_path, "rb") as f:
        atomic_write_bytes(path, f.read())


# ---- the local half: files written whole or not at all ----------------------------------------------
def _atomic_write(local_path: str, data: bytes, name: str) -> None:
    """Write `data` to `local_path` so that readers see either the old content or the complete new
    one; `name` (the path as the caller gave it) is the one errors show."""
    tmp = f"{local_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        folder = os.path.dirname(local_path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
        os.replace(tmp, local_path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a full disk must not keep the half-written copy
            os.remove(tmp)
        if isinstance(err, OSError):
            raise _write_error(name, err) from None
        raise


def _append_whole(local_path: str, text: str, name: str) -> None:
    """Append `text` to a local file entirely or not at all: a write that fails part way (no space
    left) is cut back to the old end, so the file never ends in half a line the next append extends."""
    fd = os.open(local_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = memoryview(text.encode())
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise _write_error(name, err) from None
    finally:
        os.close(fd)


def _drop_partial_line(local_path: str, name: str) -> None:
    """Cut a last line without its newline (a process killed while appending, before dinolab cut
    appends back itself) so that the next line starts on a line of its own."""
    if not os.path.exists(local_path) or os.path.getsize(local_path) == 0:
        return
    with open(local_path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:
            start = max(0, keep - 65536)
            f.seek(start)
            chunk = f.read(keep - start)
            if keep == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        f.truncate(keep)
    log.warning("%s ended in a partial line (%d bytes, an interrupted write): removed", name, end - keep)


class AppendLog:
    """An append-only text file (metrics.jsonl, train.log) at a local or remote path.

    Local paths are appended to directly. A remote file is kept in a local staging copy (seeded with
    the remote content, so a resumed run continues the same file) and published whole by `sync()`:
    at every checkpoint and at exit. What a killed process appended after its last sync is lost from
    the remote copy, which is fine for a run log: the resumed run repeats those steps.

    Every append is whole or nothing (`WriteError` otherwise, also kept in `failure` for `check()`:
    the log handler cannot raise), and a partial last line found on opening is removed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.remote = is_remote(path)
        self.failure: WriteError | None = None
        if not self.remote:
            self.local_path = _fs(path)[1]
            makedirs(parent(self.local_path) or ".")
            _drop_partial_line(self.local_path, path)
            return
        handle, self.local_path = tempfile.mkstemp(prefix="dinolab-", suffix="-" + posixpath.basename(path))
        with os.fdopen(handle, "wb") as f:
            if exists(path):
                f.write(read_bytes(path))
        _drop_partial_line(self.local_path, path)
        self._synced_size = os.path.getsize(self.local_path)

    def append(self, text: str) -> None:
        try:
            _append_whole(self.local_path, text, self.path)
        except WriteError as err:
            self.failure = self.failure or err
            raise

    def check(self) -> None:
        """Raise the first append that failed (lines that could not be written are not dropped silently)."""
        if self.failure is not None:
            raise self.failure

    def snapshot(self) -> bytes:
        """The staged content as it is now."""
        with open(self.local_path, "rb") as f:
            return f.read()

    def published(self, size: int) -> None:
        """Someone else (the checkpoint writer) published a snapshot of `size` bytes: `sync` and
        `close` upload again only what was appended after it."""
        if self.remote:
            self._synced_size = max(self._synced_size, size)

    def sync(self) -> None:
        """Publish the staged copy (remote only; a no-op when nothing was appended since)."""
        if not self.remote or os.path.getsize(self.local_path) == self._synced_size:
            return
        size = os.path.getsize(self.local_path)
        upload_file(self.local_path, self.path)
        self._synced_size = size

    def close(self) -> None:
        if self.remote:
            try:
                self.sync()
            finally:
                with contextlib.suppress(OSError):
                    os.remove(self.local_path)
