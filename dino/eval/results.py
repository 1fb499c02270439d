"""Reading evaluation results back: the result JSONs a protocol wrote under `<folder>/eval/<protocol>/`
(`dino.eval.features.write_result`), for status, exports and reports. Light on imports on purpose."""

from __future__ import annotations

import json
from typing import Any

from dino import storage


def read_results(folder: str, protocol: str) -> list[tuple[str, dict[str, Any]]]:
    """(file name, result) of every result JSON of `protocol` under `folder`, oldest first (results
    carry their finish time)."""
    base = storage.join(folder, "eval", protocol)
    found = [
        (name, json.loads(storage.read_text(storage.join(base, name))))
        for name in storage.listdir(base)
        if name.endswith(".json")
    ]
    return sorted(found, key=lambda item: item[1].get("time", 0))
