"""The errors of dino/io/storage.py, shared by its local and object-store halves."""

from __future__ import annotations


class StorageError(RuntimeError):
    """A path that cannot be reached or used (credentials, bucket, endpoint); the message says which."""


class WriteError(StorageError):
    """A local file that could not be written (no space left, quota, read-only file system); nothing
    half-written is left behind: temporary files are removed and appends are cut back."""


def write_error(path: str, err: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {err.strerror or err}")
