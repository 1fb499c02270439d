"""Object stores (s3://...) behind dino/io/storage.py: options, the endpoint, retries and clear errors.

Credentials and the endpoint come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, `AWS_PROFILE`) and are never written anywhere by dinolab; `configure()` adds
non-secret fsspec options (endpoint, region) from the config. Missing credentials, a missing bucket
and an unreachable endpoint raise `StorageError` with a message that says which; connection failures
are retried a few times first. Before the first write to a bucket the endpoint is reached with a
plain TCP connection (s3fs answers "no such bucket" for an endpoint it cannot reach, after
botocore's retries), so a refused connection is reported as such, in seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("dino.storage")  # one logger for all storage messages, local or remote
T = TypeVar("T")


class StorageError(RuntimeError):
    """A path that cannot be reached or used (credentials, bucket, endpoint, a full disk); the message
    says which. Re-exported by dino/io/storage.py, whose API raises it."""


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


def configure(endpoint_url: str = "", region: str = "") -> None:
    """Non-secret object-store options from the config (`storage.endpoint_url`, `storage.region`)."""
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    _options["s3"] = {"client_kwargs": client_kwargs} if client_kwargs else {}


def remote_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, path within it) of a URL, with dinolab's options for its protocol."""
    protocol = path.split("://", 1)[0]
    options = {**_DEFAULT_OPTIONS.get(protocol, {}), **_options.get(protocol, {})}
    return url_to_fs(path, **options)


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


def call(what: str, path: str, fn: Callable[[], T]) -> T:
    """Run one operation on the object store at `path`; retry connection failures, turn known
    failures into StorageError."""
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
                endpoint = _resolved_endpoint(remote_fs(path)[0])
                raise _unreachable(what, path, endpoint, f"{type(err).__name__}: {err}") from None
            log.warning("%s %s failed (%s); retrying (%d/%d)", what, path, err, attempt, RETRIES)
            time.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def check_bucket(path: str) -> None:
    """Writes to a missing bucket fail with a clear error (s3fs would otherwise create the bucket)."""
    fs, p = remote_fs(path)
    bucket = p.split("/", 1)[0]
    if bucket in _checked_buckets:
        return
    _check_reachable(fs, "write", path)
    if not call("check the bucket of", path, lambda: fs.exists(bucket)):
        if _no_credentials():
            raise _credentials_error("write", path)
        raise StorageError(
            f"cannot write {path}: bucket '{bucket}' does not exist at {_endpoint()}. "
            "Create it first or fix the path."
        )
    _checked_buckets.add(bucket)
