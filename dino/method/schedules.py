"""Per-iteration schedules as arrays indexed by global step (pure functions, precomputed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dino.config.schema import OptimConfig, TeacherConfig


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then cosine from `base` to `final`."""
    warmup = np.linspace(warmup_start, base, warmup_steps) if warmup_steps > 0 else np.array([])
    steps = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    out = np.concatenate((warmup, cosine))
    assert len(out) == total_steps
    return out


def teacher_temp_schedule(warmup_temp: float, temp: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    warmup = np.linspace(warmup_temp, temp, warmup_steps) if warmup_steps > 0 else np.array([])
    return np.concatenate((warmup, np.full(total_steps - warmup_steps, temp)))


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def build_schedules(
    optim: OptimConfig, teacher: TeacherConfig, steps_per_epoch: int, world_size: int
) -> Schedules:
    """All schedules of ANCHORS.md for `optim.epochs * steps_per_epoch` steps."""
    total = optim.epochs * steps_per_epoch
    global_batch = optim.batch_size * world_size
    peak_lr = optim.lr * global_batch / 256
    return Schedules(
        lr=cosine_schedule(peak_lr, optim.min_lr, total, optim.warmup_epochs * steps_per_epoch),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, total),
        momentum=cosine_schedule(teacher.momentum, 1.0, total),
        teacher_temp=teacher_temp_schedule(
            teacher.warmup_temp, teacher.temp, total, teacher.warmup_temp_epochs * steps_per_epoch
        ),
        freeze_last_layer_steps=optim.freeze_last_layer * steps_per_epoch,
    )


def rung_step(fraction: float, total_steps: int) -> int:
    """The step a run stops at for `train.stop_at=fraction` (a search's rung, launcher/halving.py):
    the nearest step, at least 1, and the last step for 1.0. One function for the loop and the
    launcher, so the rung the launcher waits for is the step the run stops at."""
    return min(total_steps, max(1, round(fraction * total_steps)))
