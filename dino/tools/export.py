"""Weights out: a run's teacher backbone as a file other code loads without dinolab.

`export_backbone` takes the newest complete checkpoint (or a given step) and writes
  - `timm`: `.safetensors` in timm's key layout, loadable with
    `timm.create_model(<timm name>, pretrained=True, pretrained_cfg_overlay={"file": OUT}, **kwargs)`
    (the name and kwargs are in the JSON beside it);
  - `reference`: `.pth`, the layout of the reference's released `*_pretrain.pth` (a plain state dict),
    which `torch.load` + the reference's `vit_*` (and dinolab's `weights=`) read;
and `<OUT>.json` beside it: architecture, the timm call, config hash, step, the run's k-NN and linear
results at that step, the code version and the file's SHA-256. An existing file is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from dino import code_version
from dino.config.schema import ARCHS, from_dict
from dino.eval.evaluated import teacher_backbone
from dino.eval.results import read_results
from dino.io import checkpoint, storage
from dino.io.checkpoint import CheckpointError

log = logging.getLogger("dino.export")
FORMATS = {"timm": ".safetensors", "reference": ".pth"}


class ExportError(CheckpointError):
    """Nothing to export, or a file that would be overwritten; the message says which."""


@dataclass(frozen=True)
class Exported:
    path: str
    sidecar: dict[str, Any]


def out_path(out: str, fmt: str) -> str:
    """OUT with the format's suffix added when it has none."""
    suffix = FORMATS[fmt]
    return out if out.endswith(suffix) else out + suffix


def _results(run_dir: str, step: int) -> dict[str, Any]:
    """The run's own evaluations of this step (not baselines): headline numbers by protocol."""
    found: dict[str, Any] = {}
    for protocol in ("knn", "linear"):
        for name, record in read_results(run_dir, protocol):
            if not name.startswith(f"{step:09d}-"):
                continue
            if protocol == "knn":
                found.setdefault("knn", []).append(
                    {"data": record["data"]["name"], "num_test": record["num_test"], "top1": record["top1"]}
                )
            elif record.get("finished"):
                found.setdefault("linear", []).append(
                    {
                        "data": record["data"]["name"],
                        "top1": record["final"]["top1"],
                        "epochs": record["final"]["epoch"],
                    }
                )
    return found


def export_backbone(run_dir: str, out: str, fmt: str = "timm", step: int | None = None) -> Exported:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt} is not allowed; choose one of: {', '.join(FORMATS)}")
    path = out_path(out, fmt)
    sidecar_path = path + ".json"
    for existing in (path, sidecar_path):
        if storage.exists(existing):
            raise ExportError(f"{existing} exists; nothing was written (dinolab never overwrites an export)")
    if step is None:
        loaded = checkpoint.load_latest(run_dir)
        if loaded is None:
            raise ExportError(
                f"no complete checkpoint in {checkpoint.checkpoints_root(run_dir)}: nothing to export"
            )
    else:
        loaded = checkpoint.load(checkpoint.checkpoint_path(run_dir, step))
    run_cfg = from_dict(loaded.state["config"])
    state = {k: v.contiguous() for k, v in teacher_backbone(loaded.state, run_cfg).state_dict().items()}
    if fmt == "timm":
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    timm_name, shape = ARCHS[run_cfg.model.name]
    kwargs = {
        "num_classes": 0,
        "patch_size": run_cfg.model.patch_size,
        "img_size": run_cfg.crops.global_size,
        "dynamic_img_size": True,
        **shape,
    }
    sidecar = {
        "format": fmt,
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "architecture": {
            "model": run_cfg.model.name,
            "patch_size": run_cfg.model.patch_size,
            "img_size": run_cfg.crops.global_size,
            "timm_name": timm_name,
            "timm_kwargs": kwargs,
        },  # fmt: skip
        "run_dir": run_dir,
        "checkpoint": loaded.path,
        "step": loaded.step,
        "epoch": loaded.state.get("epoch"),
        "config_hash": loaded.marker.get("config_hash"),
        "results": _results(run_dir, loaded.step),
        "code_version": code_version(),
        "time": time.time(),
    }
    storage.atomic_write_bytes(path, data)
    storage.atomic_write_text(sidecar_path, json.dumps(sidecar, indent=1))
    return Exported(path, sidecar)
