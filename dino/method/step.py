"""One DINO training step: schedules -> forward -> loss -> backward/clip -> optimizer -> EMA -> metrics.

Nothing here synchronises with the host: metrics come back as device tensors that the loop reduces
every `train.log_every` steps, and the per-parameter gradient clipping of the reference is done
with foreach kernels instead of one `.item()` per parameter.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dino.method.loss import DINOLoss
from dino.method.schedules import Schedules

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only: biases and 1-D parameters (norms, weight_g) get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, device_type: str) -> torch.optim.Optimizer:
    fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model), lr=0.0, weight_decay=0.0, **fast)


@torch.no_grad()
def clip_gradients_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient to norm <= max_norm separately (the reference's semantics).

    Returns the per-parameter norms before clipping (a device tensor; no host sync).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads)).float()
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors.unbind(), grads, strict=True)])
    return norms


def cancel_last_layer_gradients_(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update_(
    teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float
) -> None:
    """θt ← m·θt + (1−m)·θs for every parameter, in two foreach kernels."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


@dataclass(kw_only=True)
class StepState:
    """Everything one step touches; built once per run (`dino/run/build.py`), by keyword."""

    student: nn.Module  # MultiCropWrapper, possibly wrapped in DistributedDataParallel
    student_module: nn.Module  # the unwrapped student (EMA source)
    teacher: nn.Module
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: Schedules
    device_type: str
    precision: str
    clip_grad: float
    clock: Any = None
    """Optional `start()`/`forward_done()` around the forward pass (dino/run/train_metrics.py StepClock:
    each rank's own time per step, to find a straggler)."""

    def __post_init__(self) -> None:
        # Parameter lists are built once; EMA pairs them by name so the order cannot drift.
        teacher_by_name = dict(self.teacher.named_parameters())
        names = [n for n, _ in self.student_module.named_parameters()]
        self.ema_teacher = [teacher_by_name[n] for n in names]
        self.ema_student = [p for _, p in self.student_module.named_parameters()]
        self.trainable = [p for p in self.student_module.parameters() if p.requires_grad]

    def autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)


def set_hyperparameters(state: StepState, step: int) -> None:
    for i, group in enumerate(state.optimizer.param_groups):
        group["lr"] = float(state.schedules.lr[step])
        if i == 0:  # the regularised group
            group["weight_decay"] = float(state.schedules.weight_decay[step])


def train_step(state: StepState, crops: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """One optimisation step at global step `step`; returns device-tensor metrics (no host sync)."""
    set_hyperparameters(state, step)
    if state.clock is not None:
        state.clock.start()
    with state.autocast():
        with torch.no_grad():
            teacher_out = state.teacher(crops[:2])
        student_out = state.student(crops)
    if state.clock is not None:
        state.clock.forward_done()
    loss, signals = state.loss_fn(student_out, teacher_out, float(state.schedules.teacher_temp[step]))

    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if state.clip_grad > 0:
        state.scaler.unscale_(state.optimizer)
        clip_gradients_(state.trainable, state.clip_grad)
    if step < state.schedules.freeze_last_layer_steps:
        cancel_last_layer_gradients_(state.student_module)
    state.scaler.step(state.optimizer)
    state.scaler.update()

    ema_update_(state.ema_teacher, state.ema_student, float(state.schedules.momentum[step]))
    return {"loss": loss.detach(), **signals}
