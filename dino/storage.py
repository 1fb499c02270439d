"""The one module that touches files: local paths and fsspec URLs (s3://...) behind one small API.

Publishing: `atomic_write_bytes` makes readers see the old content or the complete new one — locally
a temporary name in the same folder, then a rename; on an object store a single PUT, which the store
makes visible only once complete. Multi-file objects (checkpoints) write their parts first and a
marker object last (see `dino.checkpoint`).

Object stores: credentials and the endpoint come from the environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`) and are never written anywhere by dinolab;
`configure()` adds non-secret fsspec options (endpoint, region) from the config. Missing credentials, a
missing bucket and an unreachable endpoint raise `StorageError` with a message that says which;
connection failures are retried a few times first. Before the first write to a bucket the endpoint
is reached with a plain TCP connection (s3fs answers "no such bucket" for an endpoint it cannot
reach, after botocore's retries), so a refused connection is reported as such, in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("dino.storage")
T = TypeVar("T")

# Attempts for an operation that failed to connect (each attempt has botocore's own retries, tuned
# with AWS_MAX_ATTEMPTS / AWS_RETRY_MODE); DINOLAB_STORAGE_RETRIES overrides it.
RETRIES = max(1, int(os.environ.get("DINOLAB_STORAGE_RETRIES", "3")))
RETRY_WAIT_S = 1.0
# How long one TCP connection to the endpoint may take before it counts as unreachable.
CONNECT_TIMEOUT_S = 5.0
# Object-store options dinolab always sets: listings are read fresh (another process may have written
# a checkpoint since), and the endpoint of `AWS_ENDPOINT_URL` is honoured by botocore itself.
_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"s3": {"use_listings_cache": False}}
_options: dict[str, dict[str, Any]] = {}
_checked_buckets: set[str] = set()


class StorageError(RuntimeError):
    """A path that cannot be reached or used (credentials, bucket, endpoint); the message says which."""


class WriteError(StorageError):
    """A local file that could not be written (no space left, quota, read-only file system); nothing
    half-written is left behind: temporary files are removed and appends are cut back."""


def _write_error(path: str, err: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {err.strerror or err}")


_LOCAL = fsspec.filesystem("file")


def _local(path: str) -> str:
    """A local path as fsspec reads it (file:// dropped, ~ expanded)."""
    return os.path.expanduser(path.removeprefix("file://"))


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def configure(endpoint_url: str = "", region: str = "") -> None:
    """Non-secret object-store options from the config (`storage.endpoint_url`, `storage.region`)."""
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    _options["s3"] = {"client_kwargs": client_kwargs} if client_kwargs else {}


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if not is_remote(path):
        # url_to_fs parses the URL and looks the file system up on every call: a tenth of a
        # millisecond that `sweep status` paid thousands of times on a 1,000-run sweep.
        return _LOCAL, _LOCAL._strip_protocol(path)
    protocol = path.split("://", 1)[0]
    options = {**_DEFAULT_OPTIONS.get(protocol, {}), **_options.get(protocol, {})}
    return url_to_fs(path, **options)


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, path within it) with dinolab's options, for what the small API above
    does not cover (the run lock's conditional PUTs)."""
    return _fs(path)


def _endpoint() -> str:
    configured = _options.get("s3", {}).get("client_kwargs", {}).get("endpoint_url")
    return configured or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def _resolved_endpoint(fs: fsspec.AbstractFileSystem) -> str:
    """The S3 endpoint as botocore resolved it (config, environment, AWS profile or AWS itself)."""
    try:
        return fs.connect().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only for a message
        return _endpoint()


def _advice() -> str:
    """Where the endpoint comes from, for an "unreachable" error."""
    if _options.get("s3", {}).get("client_kwargs", {}).get("endpoint_url"):
        return "check storage.endpoint_url and the network"
    if os.environ.get("AWS_ENDPOINT_URL"):
        return "check AWS_ENDPOINT_URL and the network"
    return "check the network, or set storage.endpoint_url or AWS_ENDPOINT_URL"


def _unreachable(what: str, path: str, endpoint: str, reason: str) -> StorageError:
    attempts = f"{RETRIES} attempt{'s' if RETRIES > 1 else ''}"
    return StorageError(
        f"cannot reach the S3 endpoint {endpoint} to {what} {path} ({reason}; {attempts}): {_advice()}"
    )


def _connect_error(endpoint: str) -> str:
    """Why a TCP connection to `endpoint` fails ("" when it connects)."""
    url = urlsplit(endpoint)
    host = url.hostname or ""
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return f"no valid port in {endpoint!r}"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return ""
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror:
        return f"unknown host '{host}'"
    except TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as err:
        return err.strerror or str(err)


def _behind_proxy(fs: fsspec.AbstractFileSystem, endpoint: str) -> bool:
    """True when botocore talks to `endpoint` through an HTTP proxy (HTTPS_PROXY etc., or the
    client's config), so a direct connection says nothing."""
    import urllib.request

    url = urlsplit(endpoint)
    if getattr(fs.connect().meta.config, "proxies", None):
        return True
    return url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.hostname or "")


def _check_reachable(fs: fsspec.AbstractFileSystem, what: str, path: str) -> None:
    """Raise StorageError when the object store's endpoint refuses or does not answer a TCP
    connection (retried like any connection failure)."""
    if type(fs).__name__ != "S3FileSystem":
        return
    endpoint = _resolved_endpoint(fs)
    if _behind_proxy(fs, endpoint):  # the endpoint itself may be closed to us: the proxy reaches it
        return
    for attempt in range(1, RETRIES + 1):
        reason = _connect_error(endpoint)
        if not reason:
            return
        if attempt == RETRIES:
            raise _unreachable(what, path, endpoint, reason)
        log.info("S3 endpoint %s: %s; retrying (%d/%d)", endpoint, reason, attempt, RETRIES)
        time.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))


def _error_kind(err: BaseException) -> str:
    """'credentials', 'bucket', 'connection' or '' for errors that are the caller's to handle."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return "credentials"
    if isinstance(err, FileNotFoundError) and "bucket does not exist" in str(err):
        return "bucket"
    if isinstance(err, PermissionError) or names & {"ClientError"} and "AccessDenied" in str(err):
        return "denied"
    if names & {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                "ClientOSError", "ConnectionError", "TimeoutError"}:  # fmt: skip
        return "connection"
    return ""


def _no_credentials() -> bool:
    """True when botocore finds no credentials (env, profile, instance role): s3fs then reads and lists
    anonymously, so a private bucket looks missing instead of failing on credentials."""
    import botocore.session

    return botocore.session.get_session().get_credentials() is None


def _credentials_error(what: str, path: str) -> StorageError:
    return StorageError(
        f"cannot {what} {path}: no credentials for the object store. Set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment; configs never hold them."
    )


def _call(what: str, path: str, fn: Callable[[], T]) -> T:
    """Run one storage operation; retry connection failures, turn known failures into StorageError."""
    if not is_remote(path):
        return fn()
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below, everything else re-raised as is
            kind = _error_kind(err)
            bucket = path.split("://", 1)[1].split("/", 1)[0]
            if kind == "credentials" or kind == "bucket" and _no_credentials():
                raise _credentials_error(what, path) from None
            if kind == "bucket":
                raise StorageError(
                    f"cannot {what} {path}: bucket '{bucket}' does not exist at {_endpoint()}. "
                    "Create it first or fix the path."
                ) from None
            if kind == "denied":
                raise StorageError(f"cannot {what} {path}: access denied ({err})") from None
            if kind != "connection":
                raise
            if attempt == RETRIES:
                endpoint = _resolved_endpoint(_fs(path)[0])
                raise _unreachable(what, path, endpoint, f"{type(err).__name__}: {err}") from None
            log.warning("%s %s failed (%s); retrying (%d/%d)", what, path, err, attempt, RETRIES)
            time.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _check_bucket(path: str) -> None:
    """Writes to a missing bucket fail with a clear error (s3fs would otherwise create the bucket)."""
    if not is_remote(path):
        return
    fs, p = _fs(path)
    bucket = p.split("/", 1)[0]
    if bucket in _checked_buckets:
        return
    _check_reachable(fs, "write", path)
    if not _call("check the bucket of", path, lambda: fs.exists(bucket)):
        if _no_credentials():
            raise _credentials_error("write", path)
        raise StorageError(
            f"cannot write {path}: bucket '{bucket}' does not exist at {_endpoint()}. "
            "Create it first or fix the path."
        )
    _checked_buckets.add(bucket)


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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` so that readers see either the old content or the complete new one."""
    fs, p = _fs(path)
    if is_remote(path):
        _check_bucket(path)
        _call("write", path, lambda: fs.pipe_file(p, data))  # one PUT: visible only once complete
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        folder = os.path.dirname(p)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a full disk must not keep the half-written copy
            os.remove(tmp)
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
