"""Local files written whole or not at all: atomic replacement (a temporary name in the same folder,
then a rename), appends cut back when they fail part way, and a partial last line cut on opening.
The local half of dino/io/storage.py; a full disk is a `WriteError`, with nothing half-written left."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

from dino.io.storage_errors import write_error

log = logging.getLogger("dino.storage")  # one logger for all storage messages, local or remote


def atomic_write(local_path: str, data: bytes, name: str) -> None:
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
            raise write_error(name, err) from None
        raise


def append_whole(local_path: str, text: str, name: str) -> None:
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
            raise write_error(name, err) from None
    finally:
        os.close(fd)


def drop_partial_line(local_path: str, name: str) -> None:
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
