"""Calibrated speed: `dinolab bench --save` records of a shape on a card (`<root>/bench.json`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dino.config.schema import DinoConfig
from dino.io import storage
from dino.run import cards
from launcher.cost.model import CALIBRATED, Speed
from launcher.cost.shapes import SHAPE_KEYS, UNKNOWN_GPU, shape_of
from launcher.sweep import Sweep

BENCH_FILE = "bench.json"


def bench_path(sweep: Sweep) -> str:
    """The sweep's bench store: beside its default SQLite store, in the sweep's (local) root."""
    return os.path.join(sweep.local_root, BENCH_FILE)


def bench_key(shape: tuple[str, ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in zip((*SHAPE_KEYS, "card"), shape, strict=True))


def read_bench(path: str) -> dict[str, dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    try:
        return json.loads(Path(path).read_text()).get("records", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def save_bench(path: str, cfg: DinoConfig, result: Any) -> str:
    """Keep a bench result as the calibration of its shape on its card; `path` is the file or a
    folder (then `<folder>/bench.json`, e.g. a sweep's root). Returns the file written."""
    if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, BENCH_FILE)
    rate = result.end_to_end_img_per_s or result.synthetic_img_per_s  # what a run gets, when known
    shape = shape_of(cfg, cards.card_name(result.device))
    records = read_bench(path)
    records[bench_key(shape)] = {
        "img_per_s": rate, "memory_gib": result.peak_memory_gib, "device": result.device,
        "input": "end to end" if result.end_to_end_img_per_s else "synthetic", "time": time.time(),
        "flops_per_image": result.flops_per_step / max(result.batch_size, 1),
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    storage.atomic_write_text(path, json.dumps({"records": records}, indent=1, sort_keys=True))
    return path


def calibrated_speed(shape: tuple[str, ...], bench: dict[str, dict[str, Any]]) -> Speed | None:
    for key in [bench_key(shape)] if shape[-1] != UNKNOWN_GPU else list(bench):
        rec = bench.get(key)
        if rec is None:
            continue
        if shape[-1] == UNKNOWN_GPU:  # any GPU record of this shape
            rec_card = key.rsplit("card=", 1)[-1]
            if key.rsplit(",card=", 1)[0] != bench_key(shape).rsplit(",card=", 1)[0] or rec_card == cards.CPU:
                continue
        day = time.strftime("%Y-%m-%d", time.gmtime(rec.get("time", 0)))
        return Speed(rec["img_per_s"], rec.get("memory_gib"), CALIBRATED,
                     f"dinolab bench {day} on {rec.get('device', '?')}, {rec.get('input', '')} input")  # fmt: skip
    return None
