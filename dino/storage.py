"""The one module that touches files: local paths and fsspec URLs (s3://...) behind one small API.

Writes that must never be seen half-done go through `atomic_write_bytes`: a temporary name in the
same folder, then a rename. Everything else is a thin layer over fsspec so `s3://` can follow.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(path)


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = _fs(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Base names of the entries directly under `path` (empty when it does not exist)."""
    fs, p = _fs(path)
    if not fs.exists(p):
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def open_file(path: str, mode: str = "rb") -> IO:
    fs, p = _fs(path)
    return fs.open(p, mode)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` so that readers see either the old file or the complete new one."""
    fs, p = _fs(path)
    parent = posixpath.dirname(p) if "://" in path else os.path.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
        if hasattr(f, "flush"):
            f.flush()
        if hasattr(f, "fileno"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.fsync(f.fileno())
    fs.mv(tmp, p)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_text(path: str, text: str) -> None:
    """Append to a log file (local paths only: object stores have no append)."""
    fs, p = _fs(path)
    with fs.open(p, "a") as f:
        f.write(text)


def remove(path: str) -> None:
    """Remove a file or a whole folder; missing paths are fine."""
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)
