"""What a checkpoint holds, listed once: `TrainState.state_dict()` is the payload a checkpoint writes and
`load_state_dict()` reads it back (the keys and layout of every checkpoint written so far)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from dino.config.identity import semantic_diff
from dino.config.schema import DinoConfig
from dino.io import checkpoint
from dino.method.loss import DINOLoss

log = logging.getLogger("dino.train")


class ConfigMismatchError(RuntimeError):
    """The run directory or checkpoint belongs to another config; the message lists the keys."""


@dataclass(kw_only=True)
class TrainState:
    """The networks and optimiser state of a run, its position (`step`), the RNG states of its ranks
    (gathered when a checkpoint is written) and the wall seconds it has trained (for GPU-hours)."""

    student: torch.nn.Module  # unwrapped (no DistributedDataParallel): its keys are the checkpoint's
    teacher: torch.nn.Module
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict[str, Any]  # `to_dict(cfg)`: a resumed run is checked against it
    steps_per_epoch: int = 1
    step: int = 0
    rng: list[dict[str, Any]] = field(default_factory=list)  # one state per rank
    train_seconds: float = 0.0

    def _parts(self) -> dict[str, Any]:
        return {"student": self.student, "teacher": self.teacher, "optimizer": self.optimizer,
                "scaler": self.scaler, "loss": self.loss_fn}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        spe, step = self.steps_per_epoch, self.step
        return {
            **{key: part.state_dict() for key, part in self._parts().items()},
            "step": step,
            "epoch": step / spe,
            "data_position": {"epoch": step // spe, "batch_in_epoch": step % spe, "steps_per_epoch": spe},
            "rng": self.rng,
            "train_seconds": self.train_seconds,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Networks strictly; `train_seconds` is absent from checkpoints before dinolab 0.1.1."""
        for key, part in self._parts().items():
            if isinstance(part, torch.nn.Module):
                part.load_state_dict(state[key], strict=True)
            else:
                part.load_state_dict(state[key])
        self.step, self.rng = state["step"], state["rng"]
        self.train_seconds = float(state.get("train_seconds", 0.0))


def restore_latest(cfg: DinoConfig, state: TrainState) -> checkpoint.LoadedCheckpoint | None:
    """Load the newest complete checkpoint of cfg.run.dir into `state`; None when there is none.
    A checkpoint of another config is refused, naming the keys."""
    latest = checkpoint.load_latest(cfg.run.dir)
    if latest is None:
        return None
    diff = semantic_diff(latest.state["config"], cfg)
    if diff:
        raise ConfigMismatchError(
            f"checkpoint {latest.path} was written by another config: {'; '.join(diff)}"
        )
    state.load_state_dict(latest.state)
    log.info(
        "resumed from %s (step %d, epoch %.2f)", latest.path, latest.step, latest.step / state.steps_per_epoch
    )
    return latest
