"""The cost figures of a sweep: a stage's speed (and where it comes from), a stage's, a run's and the
whole sweep's GPU-hours and wall time. Plain arithmetic; launcher/cost/estimate.py fills them in."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import UserError
from launcher.grid import RunSpec

# Where a speed comes from, in order of trust (launcher/cost/estimate.py); unknown: no figure at all.
MEASURED, CALIBRATED, ESTIMATED, UNKNOWN = "measured", "calibrated", "estimated", "unknown"


class BudgetExceeded(UserError):
    """A submission whose estimate is over `--max-gpu-hours` or the sweep's `budget:`."""


@dataclass
class Speed:
    """img/s per GPU and peak memory per GPU of one stage shape, and where they come from."""

    img_per_s: float | None
    memory_gib: float | None
    source: str
    detail: str


@dataclass
class StageCost:
    stage: str
    images: int | None  # None: the dataset's size is unknown here
    devices: int
    speed: Speed
    fraction: float = 1.0  # of the whole stage: a resumed run's pretraining has only the rest to do
    missing: str = ""  # images None: what is missing and the key that fixes it

    @property
    def gpu_hours(self) -> float | None:
        if self.images is None or not self.speed.img_per_s:
            return None
        return self.images / self.speed.img_per_s / 3600

    @property
    def hours(self) -> float | None:
        gpu_hours = self.gpu_hours
        return None if gpu_hours is None else gpu_hours / self.devices


def _total(values: list[float | None]) -> float | None:
    """The sum, or None (unknown) when any part is unknown."""
    return None if None in values else sum(values)


@dataclass
class RunCost:
    run: RunSpec
    stages: list[StageCost]

    def stage(self, name: str) -> StageCost | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def gpu_hours(self) -> float | None:
        return _total([s.gpu_hours for s in self.stages])

    @property
    def pretrain_gpu_hours(self) -> float | None:
        pre = self.stage("pretrain")
        return pre.gpu_hours if pre else 0.0

    @property
    def hours(self) -> float | None:
        """Wall time of the run's own jobs one after the other (pretraining, then each evaluation)."""
        return _total([s.hours for s in self.stages])

    @property
    def memory_gib(self) -> float | None:
        values = [s.speed.memory_gib for s in self.stages if s.speed.memory_gib is not None]
        return max(values) if values else None

    @property
    def source(self) -> str:
        """The pretraining's source (the stage that costs most), else the first stage's."""
        stage = self.stage("pretrain") or (self.stages[0] if self.stages else None)
        return stage.speed.source if stage else "-"


@dataclass
class SweepCost:
    runs: list[RunCost]
    wall_hours: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours or 0.0 for r in self.runs)

    @property
    def unknown(self) -> list[RunCost]:
        return [r for r in self.runs if r.gpu_hours is None]

    def by_stage(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for r in self.runs:
            for s in r.stages:
                totals[s.stage] = totals.get(s.stage, 0.0) + (s.gpu_hours or 0.0)
        return totals

    def sources(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.source] = counts.get(r.source, 0) + 1
        return counts

    def most_expensive(self, n: int = 3) -> list[RunCost]:
        return sorted(self.runs, key=lambda r: -(r.gpu_hours or 0.0))[:n]
