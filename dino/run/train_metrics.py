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


class StepClock:
    """One rank's own time per step, for finding a straggler: waiting for its batch plus its forward
    pass, up to the loss, whose centre all-reduce is the step's first collective.

    A synchronous job's wall time per step is the same on every rank (the fast ones wait in the
    collectives for the slow one), so only the time before a rank's first collective tells who is
    slow. On a GPU the forward is timed with CUDA events, read at the window's reduce (which
    synchronises anyway), so the step gains no host synchronisation.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.data_s, self.forward_s, self.events = 0.0, 0.0, []
        self._t = 0.0
        self._start: torch.cuda.Event | None = None

    def waited(self, seconds: float) -> None:
        """Seconds this rank waited for its batch."""
        self.data_s += seconds

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()

    def forward_done(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        else:
            self.forward_s += time.perf_counter() - self._t

    def take(self) -> float:
        """The window's own seconds (data + forward), and a new window."""
        forward = self.forward_s
        if self.events:
            self.events[-1][1].synchronize()
            forward += sum(start.elapsed_time(end) for start, end in self.events) / 1000
        own = self.data_s + forward
        self.data_s, self.forward_s, self.events = 0.0, 0.0, []
        return own


def rank_times(per_rank: list[float]) -> dict[str, float]:
    """The window's straggler figures from every rank's own seconds per step: the slowest rank, its
    time, the median of all, and its ratio to the median of the others (with two ranks, the other
    one: the median of all would be their mean, and a rank three times slower would read 1.5x)."""
    slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
    others = sorted(t for r, t in enumerate(per_rank) if r != slowest)
    middle = len(others) // 2
    median_others = others[middle] if len(others) % 2 else (others[middle - 1] + others[middle]) / 2
    every = sorted(per_rank)
    m = len(every) // 2
    return {
        "rank_step_s_max": per_rank[slowest],
        "rank_step_s_median": every[m] if len(every) % 2 else (every[m - 1] + every[m]) / 2,
        "slowest_rank": float(slowest),
        "straggler_ratio": per_rank[slowest] / max(median_others, 1e-9),
    }


class MetricsWindow:
    """Sums loss, teacher entropy and KL on the device step by step (no host sync) and turns them into
    one metrics line per window.

    `train_seconds` are the wall seconds of the kept steps (carried in checkpoints, for GPU-hours);
    the average throughput counts this process's windows after its first (warm-up: compilation,
    loader start), and the last window of the run.

    `job_fixed_s` is what this process spent beyond its steady rate: its first window's seconds over
    what its images take at `avg_img_per_s`, plus the k-NN monitor. A job pays it once whatever its
    length, so the cost estimate adds it per job start (launcher/cost/speeds.py) rather than folding
    it into img/s: a search's rung jobs pay it once each.
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
        self.paused_s = 0.0  # this process's k-NN monitor
        self.first_window: tuple[float, int] | None = None  # (seconds, images), when it is not timed
        self.clock = StepClock(device)

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
        self.paused_s += seconds

    def reduce(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """The metrics line of the window ending at `step` (same on every rank); starts a new window.
        Raises NonFiniteLossError, before anything is saved, if any rank saw a non-finite loss."""
        values = distributed.all_reduce_mean_(self.sums / max(self.steps, 1))
        bad_ranks = distributed.all_reduce_sum_((self.first_bad >= 0).float())
        loss, entropy, kl = values.tolist()
        stragglers = self._rank_times()
        elapsed = time.monotonic() - self.start
        images = self.steps * self.batch_size
        self.train_seconds += elapsed
        self.windows += 1
        if self.windows > 1 or step >= self.end_step:
            self.timed_s += elapsed
            self.timed_images += images
        else:
            self.first_window = (elapsed, images)
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
            "job_fixed_s": self._fixed_s(),
            **stragglers,
            **extra,
        }
        self.sums.zero_()
        self.start, self.steps = time.monotonic(), 0
        return self.last

    def _fixed_s(self) -> float:
        """This process's seconds beyond its steady rate so far (`job_fixed_s`): the first window's
        excess over the average rate once a later window has timed one, and the monitor."""
        excess = 0.0
        if self.first_window is not None and self.timed_s > 0:
            seconds, images = self.first_window
            excess = max(0.0, seconds - images * self.timed_s / self.timed_images)
        return excess + self.paused_s

    def _rank_times(self) -> dict[str, float]:
        """Every rank's own seconds per step this window (`StepClock`), gathered: one small
        all-reduce of a vector with one slot per rank; nothing in a single process."""
        own = self.clock.take() / max(self.steps, 1)
        if self.world_size == 1:
            return {}
        slots = torch.zeros(self.world_size, device=self.device)
        slots[distributed.info().rank] = own
        return rank_times(distributed.all_reduce_sum_(slots).tolist())
