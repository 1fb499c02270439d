"""What an evaluation evaluates: `resolve` turns overrides into an `EvalConfig` and a `Evaluated`.

The evaluated network is the frozen network (the teacher backbone of a complete checkpoint, a
weights file, or a baseline: the same architecture randomly initialised, or raw pixels) and the
provenance every result records (checkpoint path, step, config hash).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn

from dino.config.identity import config_hash as run_config_hash
from dino.config.overrides import split_all
from dino.config.schema import ConfigError, DinoConfig, from_dict, to_dict
from dino.eval.config import EvalConfig, compose_eval, run_dir_of_checkpoint
from dino.eval.splits import validate_data
from dino.io import checkpoint, storage, weights
from dino.io.checkpoint import CheckpointError
from dino.method.models import build_backbone


@dataclass
class Evaluated:
    """The network under evaluation and where it came from."""

    key: str
    """Folder name of its features and results: the checkpoint step, random-seed<N> or pixels."""
    run_dir: str
    run_cfg: DinoConfig
    backbone: nn.Module | None
    """Teacher backbone in eval mode; None for the pixels baseline."""
    provenance: dict[str, Any]
    """checkpoint path, step and config hash (None for a baseline without a checkpoint)."""

    @property
    def eval_dir(self) -> str:
        return storage.join(self.run_dir, "eval")


def _run_config_from_dir(run_dir: str) -> DinoConfig:
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise CheckpointError(f"{run_dir} is not a run folder: {path} does not exist")
    return from_dict(yaml.safe_load(storage.read_text(path)))


def teacher_backbone(state: dict[str, Any], run_cfg: DinoConfig) -> nn.Module:
    """The teacher's backbone of a checkpoint state, loaded strictly."""
    backbone = build_backbone(run_cfg.model.name, run_cfg.model.patch_size, run_cfg.crops.global_size, 0.0)
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state["teacher"].items() if k.startswith(prefix)}
    backbone.load_state_dict(weights, strict=True)
    return backbone.eval()


def resolve(overrides: list[str] | tuple[str, ...]) -> tuple[EvalConfig, Evaluated]:
    """Parse overrides, find the checkpoint (refusing incomplete ones) and build the target."""
    first = compose_eval(overrides)
    if first.weights:
        return _resolve_weights(first, overrides)
    ckpt = None
    if first.checkpoint:
        ckpt = checkpoint.load(first.checkpoint)  # refuses a partial or corrupt checkpoint
        run_dir = first.run.dir or run_dir_of_checkpoint(first.checkpoint)
    else:
        run_dir = first.run.dir
        if first.baseline == "none":
            ckpt = checkpoint.load_latest(run_dir)
            if ckpt is None:
                raise CheckpointError(
                    f"no complete checkpoint in {storage.join(run_dir, 'checkpoints')}: "
                    "train the run first, or name one with checkpoint=<folder>"
                )
    run_cfg = from_dict(ckpt.state["config"]) if ckpt else _run_config_from_dir(run_dir)
    run_data = to_dict(run_cfg.data)
    # A pretraining subset (data.limit) is not the evaluation's: knn.max_train/max_test set those.
    if "limit" in run_data:
        run_data["limit"] = 0
    cfg = compose_eval([*overrides, f"run.dir={run_dir}"], run_data)
    validate_data(cfg)
    return cfg, build_target(cfg, run_dir, run_cfg, ckpt)


def _resolve_weights(
    first: EvalConfig, overrides: list[str] | tuple[str, ...]
) -> tuple[EvalConfig, Evaluated]:
    """A weights file as the target: its own results folder, the architecture from the file."""
    if first.checkpoint or first.baseline != "none":
        raise ConfigError("weights= evaluates a file: leave checkpoint= and baseline= out")
    if not any(k == "data" or k.startswith("data.") for k, _ in split_all(overrides)):
        raise ConfigError(
            "weights= needs the evaluation data: data=fashion_mnist, or data=imagefolder data.root=<train> "
            "data.val_root=<val> (a weights file carries no dataset)"
        )
    loaded = weights.read(first.weights, first.weights_key)
    backbone = weights.backbone_for(loaded, first.model.name, first.model.patch_size)
    run_cfg = DinoConfig()
    run_cfg.model.name = loaded.architecture.matches()[0] if not first.model.name else first.model.name
    run_cfg.model.patch_size = first.model.patch_size or loaded.architecture.patch_size
    run_cfg.crops.global_size = loaded.architecture.img_size
    run_dir = first.run.dir or storage.join("runs", "weights", loaded.identity)
    cfg = compose_eval([*overrides, f"run.dir={run_dir}"])
    validate_data(cfg)
    provenance = {
        "run_dir": run_dir,
        "checkpoint": None,
        "step": loaded.step,
        "config_hash": None,
        "baseline": "none",
        "weights": loaded.path,
        "weights_sha256": loaded.sha256,
        "weights_format": loaded.format,
        "weights_key": loaded.key,
    }
    return cfg, Evaluated(f"weights-{loaded.sha256[:12]}", run_dir, run_cfg, backbone, provenance)


def build_target(
    cfg: EvalConfig, run_dir: str, run_cfg: DinoConfig, ckpt: checkpoint.LoadedCheckpoint | None
) -> Evaluated:
    provenance: dict[str, Any] = {
        "run_dir": run_dir,
        "checkpoint": ckpt.path if ckpt else None,
        "step": ckpt.step if ckpt else None,
        "config_hash": ckpt.marker.get("config_hash") if ckpt else run_config_hash(run_cfg),
        "baseline": cfg.baseline,
    }
    if cfg.baseline == "pixels":
        return Evaluated("pixels", run_dir, run_cfg, None, provenance)
    if cfg.baseline == "random":
        # Built as training builds it (seed, then the student's backbone first): the run's own init.
        seed = run_cfg.train.seed if cfg.baseline_seed < 0 else cfg.baseline_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(
                run_cfg.model.name, run_cfg.model.patch_size, run_cfg.crops.global_size, 0.0
            )
        provenance["seed"] = seed
        return Evaluated(f"random-seed{seed}", run_dir, run_cfg, backbone.eval(), provenance)
    assert ckpt is not None
    return Evaluated(f"{ckpt.step:09d}", run_dir, run_cfg, teacher_backbone(ckpt.state, run_cfg), provenance)
