"""The training loop's metrics window: device-side sums between log lines, reduced across ranks every
`train.log_every` steps (the loop's one host synchronisation), and the clock behind img/s and GPU-hours.
"""

from __future__ import annotations

import math
import resource
import time

import torch

from dino.io import checkpoint, distributed
from dino.method.schedules import Schedules


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message gives the step and the last logged values."""


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident set, KiB on Linux


class MetricsWindow:
    """Sums loss, teacher entropy and KL on the device step by step (no host sync) and turns them into
    one metrics line per window.

    `train_seconds` are the wall seconds of the kept steps (carried in checkpoints, for GPU-hours);
    the average throughput counts this process's windows after its first (warm-up: compilation,
    loader start), and the last window of the run.
    """

    def __init__(
        self,
        device: torch.device,
        schedules: Schedules,
        steps_per_epoch: int,
        batch_size: int,
        world_size: int,
        end_step: int,
        run_dir: str,
        train_seconds: float = 0.0,
    ) -> None:
        self.device, self.schedules, self.spe = device, schedules, steps_per_epoch
        self.batch_size, self.world_size = batch_size, world_size
        self.end_step, self.run_dir = end_step, run_dir
        self.train_seconds = train_seconds
        self.sums = torch.zeros(3, device=device)  # loss, teacher entropy, kl
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.last: dict[str, float] = {}
        self.start, self.steps = time.monotonic(), 0
        self.timed_s, self.timed_images, self.windows = 0.0, 0.0, 0

    def add(self, out: dict[str, torch.Tensor], step: int) -> None:
        """One step's outputs; remembers (on the device) the first step whose loss was not finite."""
        self.sums += torch.stack((out["loss"], out["teacher_entropy"], out["kl"])).float()
        bad = ~torch.isfinite(out["loss"]) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.steps += 1

    def pause(self, seconds: float) -> None:
        """Time spent on something else (the k-NN monitor): compute for GPU-hours, not for img/s."""
        self.start += seconds
        self.train_seconds += seconds

    def reduce(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """The metrics line of the window ending at `step` (same on every rank); starts a new window.
        Raises NonFiniteLossError, before anything is saved, if any rank saw a non-finite loss."""
        values = distributed.all_reduce_mean_(self.sums / max(self.steps, 1))
        bad_ranks = distributed.all_reduce_sum_((self.first_bad >= 0).float())
        loss, entropy, kl = values.tolist()
        elapsed = time.monotonic() - self.start
        images = self.steps * self.batch_size
        self.train_seconds += elapsed
        self.windows += 1
        if self.windows > 1 or step >= self.end_step:
            self.timed_s += elapsed
            self.timed_images += images
        if bad_ranks.item() > 0 or not math.isfinite(loss):
            bad_step = int(self.first_bad.item()) if self.first_bad.item() >= 0 else step
            raise NonFiniteLossError(
                f"loss is not finite at step {bad_step} (mean over the last {self.steps} steps: {loss}); "
                f"last logged values: {self.last or 'none'}. Last good checkpoint: "
                f"{(checkpoint.complete_steps(self.run_dir) or ['none'])[-1]} in {self.run_dir}/checkpoints. "
                "Lower optim.lr, use train.precision=bf16 or fp32, or raise teacher.warmup_temp_epochs."
            )
        s, rate = step - 1, images / max(elapsed, 1e-9)
        self.last = {
            "step": step,
            "epoch": step / self.spe,
            "loss": loss,
            "teacher_entropy": entropy,
            "kl": kl,
            "lr": float(self.schedules.lr[s]),
            "weight_decay": float(self.schedules.weight_decay[s]),
            "momentum": float(self.schedules.momentum[s]),
            "teacher_temp": float(self.schedules.teacher_temp[s]),
            "img_per_s": rate,
            "avg_img_per_s": self.timed_images / self.timed_s if self.timed_s > 0 else rate,
            "memory_gib": memory_gib(self.device),
            "gpu_hours": self.train_seconds * self.world_size / 3600,
            **extra,
        }
        self.sums.zero_()
        self.start, self.steps = time.monotonic(), 0
        return self.last
