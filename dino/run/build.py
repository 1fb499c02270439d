"""A run's parts from its config, for training, the benchmark and tests: the networks, optimiser,
scaler and loss (`TrainState`, what a checkpoint holds), the schedules and the step state."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from dino.config.schema import DinoConfig, to_dict
from dino.method.loss import DINOLoss
from dino.method.models import build_student_teacher
from dino.method.schedules import Schedules, build_schedules, rung_step
from dino.method.step import StepState, build_optimizer
from dino.run.state import TrainState

log = logging.getLogger("dino.train")


@dataclass
class Run:
    state: TrainState
    schedules: Schedules
    step_state: StepState
    end_step: int  # the last step this process trains to: the schedules' end or train.max_steps


def build_state(cfg: DinoConfig, device: torch.device, steps_per_epoch: int = 1) -> TrainState:
    """The parts of a fresh run, initialised from train.seed alone (identical on every rank).
    `train.compile` compiles the backbones in place (state dict keys stay)."""
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg.model, cfg.head, cfg.crops.global_size)
    if cfg.train.init_weights:
        _init_from(cfg, student, teacher)
    student, teacher = student.to(device), teacher.to(device)
    num_crops = 2 + cfg.crops.num_local
    loss_fn = DINOLoss(cfg.head.out_dim, num_crops, cfg.teacher.student_temp, cfg.teacher.center_momentum)
    optimizer = build_optimizer(student, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    if cfg.train.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    return TrainState(student=student, teacher=teacher, loss_fn=loss_fn.to(device), optimizer=optimizer,
                      scaler=scaler, config=to_dict(cfg), steps_per_epoch=steps_per_epoch)  # fmt: skip


def build_run(
    cfg: DinoConfig, device: torch.device, steps_per_epoch: int, world_size: int = 1, ddp: bool = False
) -> Run:
    """A fresh run of `steps_per_epoch` steps per epoch on `world_size` processes; `ddp` wraps the
    student in DistributedDataParallel for the step (the state keeps the unwrapped one)."""
    state = build_state(cfg, device, steps_per_epoch)
    schedules = build_schedules(cfg.optim, cfg.teacher, steps_per_epoch, world_size)
    student = state.student
    if ddp:
        student = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_state = StepState(
        student=student, student_module=state.student, teacher=state.teacher, loss_fn=state.loss_fn,
        optimizer=state.optimizer, scaler=state.scaler, schedules=schedules, device_type=device.type,
        precision=cfg.train.precision, clip_grad=cfg.optim.clip_grad,
    )  # fmt: skip
    end_step = min(schedules.total_steps, cfg.train.max_steps or schedules.total_steps)
    if cfg.train.stop_at:  # a rung: the same rounding as the launcher's (launcher/halving.py rung_step)
        end_step = min(end_step, rung_step(cfg.train.stop_at, schedules.total_steps))
    return Run(state, schedules, step_state, end_step)


def _init_from(cfg: DinoConfig, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """train.init_weights: the file's backbone (and head, when it holds one) into both networks,
    strictly; a file without a head keeps the freshly initialised one."""
    from dino.io import weights

    loaded = weights.read(cfg.train.init_weights, cfg.train.init_weights_key)
    backbone = weights.backbone_for(loaded, cfg.model.name, cfg.model.patch_size, cfg.crops.global_size)
    for net in (student, teacher):
        net.backbone.load_state_dict(backbone.state_dict(), strict=True)
        if loaded.head is not None:
            weights.load_head(loaded, net.head)
    log.info(
        "initialised from %s (%s, %s%s; sha256 %s)", loaded.path, loaded.format, loaded.key,
        ", with its head" if loaded.head is not None else ", backbone only", loaded.sha256[:12],
    )  # fmt: skip
