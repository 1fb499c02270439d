"""The run lock's lease on an object store (s3://), which has no locks: one small JSON object read
with its version (ETag) and replaced only on a condition (create if absent, or If-Match a version),
so that of two processes racing for it exactly one wins. The protocol is dino/io/lease_lock.py."""

from __future__ import annotations

import json
from typing import Any

from dino.io import storage


def read_lease(path: str) -> tuple[dict[str, Any], str]:
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


def put_lease(path: str, content: dict[str, Any], **condition: str) -> str | None:
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
    return etag or read_lease(path)[1]


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
