"""The collapse guard: stop a run whose teacher output has collapsed, instead of paying for a flat line.

DINO collapses two ways (paper section 5.3; ANCHORS.md "Collapse signals"): without sharpening the
teacher's softmax goes uniform (per-sample entropy -> ln K), without centring it goes to one dimension
(entropy -> 0). The second signal is the student-teacher KL going flat:
- one dimension: the student matches the constant target, KL ~ 0. The entropy alone is not enough
  here: a healthy, sharpened teacher also has a low per-sample entropy, but its student still has to
  predict the other views, and the KL stays well above 0 (docs/collapse.md: >= 0.08 nats);
- uniform: a uniform target says nothing about the image whatever the student does. At full scale the
  student flattens too (KL ~ 0, loss stuck at ln K); a tiny student cannot always (its weight-normed
  last layer, temperature 0.1) and its KL stays on a plateau. Flat = near 0, or moving by at most
  `kl_range` nats during the whole stretch (a KL still moving is a student still learning).

`CollapseGuard` is fed the metrics window the train loop reduces every `train.log_every` steps (mean
teacher entropy and KL over the window, the same on every rank, so every rank decides alike). The
signal must hold in every window for `train.collapse_patience_steps` after the warm-up (lr and
teacher-temperature warm-ups: targets still move by design then, and a young run may pass through a
near-uniform teacher); one window without it starts the count again. Thresholds were measured on the
runs of docs/collapse.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dino.config.schema import TrainConfig

UNIFORM, ONE_DIM = "uniform", "one dimension"
MARKER = "collapsed.json"  # in run.dir: the decision, read back by a restart (dino/run/train.py)


@dataclass(frozen=True)
class CollapseRule:
    out_dim: int
    """K, the head's output dimension: the uniform teacher's entropy is ln K."""
    warmup_steps: int
    """Windows that start before this step are not judged."""
    patience_steps: int
    """The signal must hold this many steps (whole windows) in a row."""
    uniform_margin: float
    """Uniform: entropy >= ln K - margin (nats)."""
    one_dim_fraction: float
    """One dimension: entropy < fraction * ln K."""
    kl_flat: float
    """The student has matched the teacher: KL <= this (nats)."""
    kl_range: float = 0.1
    """Uniform only: a KL that stays within this range (nats) over the stretch is flat too."""

    @classmethod
    def from_config(
        cls, train: TrainConfig, out_dim: int, warmup_epochs: Iterable[int], steps_per_epoch: int
    ) -> CollapseRule:
        """The rule of a run: its train.collapse_* keys, K, and the end of
        its longest warm-up (`warmup_epochs`: optim.warmup_epochs, teacher.warmup_temp_epochs)."""
        t = train
        return cls(
            out_dim, max(warmup_epochs) * steps_per_epoch, t.collapse_patience_steps,
            t.collapse_uniform_margin, t.collapse_one_dim_fraction, t.collapse_kl_flat, t.collapse_kl_range,
        )  # fmt: skip

    def signal(self, entropy: float, kl: float) -> str:
        """UNIFORM, ONE_DIM or "" for one window's mean teacher entropy and KL (the KL's range over
        a stretch is the guard's to judge)."""
        if not (math.isfinite(entropy) and math.isfinite(kl)):
            return ""
        log_k = math.log(self.out_dim)
        if entropy >= log_k - self.uniform_margin:
            return UNIFORM
        if entropy < self.one_dim_fraction * log_k and kl <= self.kl_flat:
            return ONE_DIM
        return ""


@dataclass(frozen=True)
class Collapse:
    """The guard's decision: the run stops at `step`; the signal held from `since`."""

    step: int
    kind: str
    since: int
    entropy: float
    kl: float
    out_dim: int
    rule: CollapseRule
    kl_low: float = 0.0
    kl_high: float = 0.0

    def describe(self) -> str:
        """One line, e.g. 'uniform: entropy 6.925 >= ln K - 0.02 (6.912) for 40 steps, kl 0.0001'."""
        log_k = math.log(self.out_dim)
        if self.kind == UNIFORM:
            test = f">= ln K - {self.rule.uniform_margin:g} ({log_k - self.rule.uniform_margin:.3f})"
        else:
            test = f"< {self.rule.one_dim_fraction:g} ln K ({self.rule.one_dim_fraction * log_k:.3f})"
        if self.kl <= self.rule.kl_flat:
            flat = f"kl {self.kl:.4f} <= {self.rule.kl_flat:g}"
        else:
            flat = f"kl {self.kl:.4f} flat ({self.kl_low:.4f}-{self.kl_high:.4f})"
        return f"{self.kind}: entropy {self.entropy:.3f} {test} for {self.step - self.since} steps (since step {self.since}), {flat}"

    def to_dict(self) -> dict[str, object]:
        return {"step": self.step, "kind": self.kind, "since": self.since, "entropy": self.entropy,
                "kl": self.kl, "signal": self.describe()}  # fmt: skip


class CollapseGuard:
    """Feed it every metrics window (`update`); it returns the Collapse once the rule fires."""

    def __init__(self, rule: CollapseRule, start_step: int = 0) -> None:
        self.rule = rule
        self.prev_step = start_step  # where the next window starts
        self.kind, self.since = "", -1  # the current streak (none: "")
        self.kl_low = self.kl_high = 0.0  # the KL's range during the streak

    def update(self, step: int, entropy: float, kl: float) -> Collapse | None:
        """The window (prev_step, step]: its mean teacher entropy and KL."""
        window_start, self.prev_step = self.prev_step, step
        kind = self.rule.signal(entropy, kl) if window_start >= self.rule.warmup_steps else ""
        low, high = min(self.kl_low, kl), max(self.kl_high, kl)
        moving = kind == UNIFORM and kl > self.rule.kl_flat and high - low > self.rule.kl_range
        if kind != self.kind or moving:  # no signal, the other kind, or a KL still moving: start again
            self.kind, self.since = kind, window_start
            low = high = kl
        self.kl_low, self.kl_high = low, high
        if kind and step - self.since >= self.rule.patience_steps:
            return Collapse(step, kind, self.since, entropy, kl, self.rule.out_dim, self.rule, low, high)
        return None
