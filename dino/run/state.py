"""What a checkpoint holds, listed once: `TrainState.state_dict()` is the payload a checkpoint writes and
`load_state_dict()` reads it back (the keys and layout of every checkpoint written so far); and what a
resume checks first (`restore_latest`): the config, then the code.

The code check: a checkpoint records the code hash of the process that wrote it
(`dino.config.identity.code_hash`; a sweep job's is its snapshot's) and the run's `train.on_code_change`
policy as the run was started. A resume with other code warns (one WARNING naming both hashes) or
refuses (`CodeMismatchError`), as `train.on_code_change` says, or, when that is "" (the default of
`dinolab train`), as the policy the checkpoint recorded says: a sweep's run (started with refuse) stays
refused when resumed by hand. A checkpoint from before code hashes is not checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from dino.config.identity import code_hash, semantic_diff
from dino.config.schema import DinoConfig
from dino.io import checkpoint
from dino.method.loss import DINOLoss

log = logging.getLogger("dino.train")


class ConfigMismatchError(RuntimeError):
    """The run directory or checkpoint belongs to another config; the message lists the keys."""


class CodeMismatchError(ConfigMismatchError):
    """A resume with code other than the checkpoint's, refused by `train.on_code_change=refuse`; the
    message names both code hashes, the run and the override."""


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
    on_code_change: str = ""
    """The run's policy for a resume with other code as it was started, "warn" or "refuse"
    (`restore_latest` sets it); "" until then: the config's, else warn."""

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
            # Copied into the checkpoint's marker too (CheckpointWriter), where the resume reads it.
            "code": {"code_hash": code_hash(), "on_code_change": self.code_policy()},
        }

    def code_policy(self) -> str:
        return self.on_code_change or self.config.get("train", {}).get("on_code_change") or "warn"

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
    A checkpoint of another config is refused, naming the keys; one of other code is warned about or
    refused as `train.on_code_change` says (`check_code`)."""
    latest = checkpoint.load_latest(cfg.run.dir)
    if latest is None:
        state.on_code_change = cfg.train.on_code_change or "warn"  # a fresh start sets the run's policy
        return None
    diff = semantic_diff(latest.state["config"], cfg)
    if diff:
        raise ConfigMismatchError(
            f"checkpoint {latest.path} was written by another config: {'; '.join(diff)}"
        )
    state.on_code_change = check_code(cfg, latest)
    state.load_state_dict(latest.state)
    log.info(
        "resumed from %s (step %d, epoch %.2f)", latest.path, latest.step, latest.step / state.steps_per_epoch
    )
    return latest


def check_code(cfg: DinoConfig, latest: checkpoint.LoadedCheckpoint) -> str:
    """Warn about or refuse (`CodeMismatchError`) a resume of `latest` with code other than its own;
    returns the run's policy as it was started, for the checkpoints this resume writes."""
    recorded = latest.marker.get("on_code_change") or ""
    policy = cfg.train.on_code_change or recorded or "warn"
    written_by, current = latest.marker.get("code_hash"), code_hash()
    if written_by and written_by != current:
        why = (
            f"train.on_code_change={policy}"
            if cfg.train.on_code_change
            else f'train.on_code_change={policy} (recorded when the run started; the setting here is "")'
        )
        if policy == "refuse":
            raise CodeMismatchError(
                f"run.dir={cfg.run.dir}: checkpoint {latest.path} was written by dinolab code {written_by}, "
                f"this process runs code {current}, and {why} refuses to resume one run with other code. "
                f"Resume with the code of {written_by} (a sweep keeps it in <sweep folder>/code/{written_by}/), "
                "or accept the change with train.on_code_change=warn"
            )
        log.warning(
            "run.dir=%s: resuming checkpoint %s, written by dinolab code %s, with code %s (%s)",
            cfg.run.dir, latest.path, written_by, current, why,
        )  # fmt: skip
    return recorded or policy
