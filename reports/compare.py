"""What a table may claim about its differences: each cell against a reference cell (`dinolab report
--vs AXIS=VALUE`, or the sweep file's `baseline:`), which cell of a column is best beyond the noise,
and how many seeds a difference of a given size needs (`--resolve POINTS`), at what cost.

Cells are rows of `reports.tables.summarize`: each holds, per column, its healthy seeds' values keyed
by seed (and the value of every axis the table does not group by), which is what pairs two cells'
runs. The statistics are reports/stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from reports import stats

RANDOM_INIT = "random-init"
"""`--vs random-init`: every cell against the randomly initialised backbone of its own seeds."""


class CompareError(ValueError):
    """A reference that names no cell of the table, or a question it cannot answer; says which."""


def same(a: object, b: object) -> bool:
    """Axis values as the sweep file and the MLflow tags spell them: 0.996 == "0.996", 2 == 2.0."""
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a) == str(b)


@dataclass(frozen=True)
class Reference:
    """The cell every other cell is compared with: axis values (those left out vary with the cell),
    or the random init."""

    axes: dict[str, object] = field(default_factory=dict)
    random_init: bool = False

    @property
    def text(self) -> str:
        return "random init" if self.random_init else ", ".join(f"{a}={v}" for a, v in self.axes.items())

    @classmethod
    def parse(cls, text: str) -> Reference:
        """`teacher.momentum=0.996`, `a=1,b=2` or `random-init`."""
        if text.strip() == RANDOM_INIT:
            return cls(random_init=True)
        axes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            axis, sep, value = part.partition("=")
            if not sep or not axis or not value:
                raise CompareError(f"--vs {text}: expected AXIS=VALUE[,AXIS=VALUE] or {RANDOM_INIT}")
            axes[axis.strip()] = _number(value.strip())
        if not axes:
            raise CompareError(f"--vs {text}: expected AXIS=VALUE[,AXIS=VALUE] or {RANDOM_INIT}")
        return cls(axes)


def _number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------------------------------
# Every cell against the reference
# --------------------------------------------------------------------------------------------------


@dataclass
class Comparisons:
    """One row per summary row (same index): `ref` (the reference row, -1: none, or the row itself),
    delta, low, high (at `level`), p, p_holm, level, resolved, paired, n, why."""

    reference: Reference
    key: str
    rows: pd.DataFrame

    @property
    def tested(self) -> int:
        return int(self.rows["p"].notna().sum())

    @property
    def count(self) -> int:
        """Comparisons in the table: every cell that has a reference other than itself."""
        return int(((self.rows["ref"] >= 0) & (self.rows["ref"] != self.rows.index)).sum())


def reference_rows(summary: pd.DataFrame, by: list[str], ref: Reference) -> list[int]:
    """For each summary row, the row it is compared with: -1 when none (a weights or random-init
    row, or no cell with the reference's values beside it); itself when it is the reference."""
    if ref.random_init:
        found = summary.index[summary["kind"] == "random init"]
        if not len(found):
            raise CompareError(
                "--vs random-init: the runs have no random-init evaluation (dinolab eval knn run.dir=RUN "
                "baseline=random logs one into the run)"
            )
        return [int(found[0]) if kind == "cell" else -1 for kind in summary["kind"]]
    unknown = [a for a in ref.axes if a not in by]
    if unknown:
        raise CompareError(f"--vs {ref.text}: '{unknown[0]}' is not an axis of this table ({', '.join(by)})")
    cells = summary[summary["kind"] == "cell"]
    for axis, value in ref.axes.items():
        if not any(same(v, value) for v in cells[axis]):
            values = ", ".join(str(v) for v in dict.fromkeys(cells[axis]))
            raise CompareError(f"--vs {ref.text}: no cell has {axis}={value} (values: {values})")
    out = []
    for _, row in summary.iterrows():
        if row["kind"] != "cell":
            out.append(-1)
            continue
        match = cells.index[
            [
                all(same(c[a], v) for a, v in ref.axes.items())
                and all(same(c[a], row[a]) for a in by if a not in ref.axes)
                for _, c in cells.iterrows()
            ]
        ]
        out.append(int(match[0]) if len(match) else -1)
    return out


def compare_to(summary: pd.DataFrame, by: list[str], key: str, ref: Reference) -> Comparisons:
    """Each cell minus its reference cell on column `key`: seed-paired where the seeds match,
    Holm-corrected over the table's tested comparisons; the interval is at the level Holm tests that
    comparison at, so it excludes 0 exactly when the difference is resolved."""
    refs = reference_rows(summary, by, ref)
    tests: dict[int, stats.Test] = {}
    for i, j in enumerate(refs):
        if j >= 0 and j != i:
            tests[i] = stats.compare(summary.at[i, f"{key}_values"], summary.at[j, f"{key}_values"])
    order = list(tests)
    adjusted = dict(zip(order, stats.holm([tests[i].p for i in order]), strict=True))
    rows = []
    for i, j in enumerate(refs):
        if i == j:
            why = "reference"
        elif summary.at[i, "kind"] != "cell":
            why = ""
        else:
            why = "no reference cell" if j < 0 else tests[i].why
        row = {"ref": j, "delta": math.nan, "low": math.nan, "high": math.nan, "p": math.nan,
               "p_holm": math.nan, "level": math.nan, "resolved": False, "paired": False, "n": 0, "why": why}  # fmt: skip
        if i in tests:
            test, p_holm = tests[i], adjusted[i]
            level = stats.holm_confidence(test.p, p_holm)
            if test.tested and level != stats.CONFIDENCE:  # the interval at Holm's level
                test = stats.compare(
                    summary.at[i, f"{key}_values"], summary.at[j, f"{key}_values"], confidence=level
                )
            row.update(delta=test.delta, low=test.low, high=test.high, p=test.p, p_holm=p_holm,
                       level=level if test.tested else math.nan, paired=test.paired, n=test.n,
                       resolved=bool(test.tested and p_holm < stats.ALPHA))  # fmt: skip
        rows.append(row)
    return Comparisons(ref, key, pd.DataFrame(rows, index=summary.index))


# --------------------------------------------------------------------------------------------------
# The best of a column
# --------------------------------------------------------------------------------------------------


def best_index(summary: pd.DataFrame, key: str, better: str) -> int | None:
    """The row to mark best in column `key`: the best mean, only when it beats the runner-up by a
    resolved difference (95 %, paired on seeds where they match); None otherwise. Random-init rows
    take no part."""
    if not better:
        return None
    rows = summary[(summary["kind"] != "random init") & (summary[f"{key}_n"] > 0)]
    if len(rows) < 2:
        return None
    ordered = rows[key].sort_values(ascending=better == "min", kind="stable")
    first, second = ordered.index[0], ordered.index[1]
    test = stats.compare(summary.at[first, f"{key}_values"], summary.at[second, f"{key}_values"])
    if not test.tested or test.p >= stats.ALPHA:
        return None
    ahead = test.low > 0 if better == "max" else test.high < 0
    return int(first) if ahead else None


# --------------------------------------------------------------------------------------------------
# Seeds a difference needs
# --------------------------------------------------------------------------------------------------


@dataclass
class SeedPlan:
    """`--resolve`: the seeds per cell for `delta` at 80 % power and what the missing runs cost."""

    delta: float
    seeds: int
    sd_seed: float
    sd_source: str
    alpha: float
    table: pd.DataFrame
    """Per comparison: cell, reference, seeds now, seeds needed, runs to add, GPU-hours, source."""
    total_runs: int
    total_gpu_hours: float | None

    def lines(self) -> list[str]:
        m = round(stats.ALPHA / self.alpha)
        level = (
            f"α = {stats.ALPHA:g}/{m} = {self.alpha:.3g} (Bonferroni, a bound on Holm)"
            if m > 1
            else (f"α = {self.alpha:g}")
        )
        hours = "?" if self.total_gpu_hours is None else f"{self.total_gpu_hours:.3g}"
        return [
            f"Seeds to resolve a difference of {self.delta:g} points with {stats.POWER:.0%} power: paired "
            f"t-test, two-sided {level}; between-seed SD {self.sd_seed:.2f} points ({self.sd_source}), "
            f"a paired difference's SD √2 × that = {math.sqrt(2) * self.sd_seed:.2f} (no gain from "
            f"pairing assumed): {self.seeds} seeds per cell.",
            f"In all: {self.total_runs} more run(s), {hours} GPU-hours; adding seeds to the sweep "
            f"(seeds: [0, …, {self.seeds - 1}]) keeps the runs already done.",
        ]


def plan_seeds(
    summary: pd.DataFrame,
    comparisons: Comparisons,
    delta: float,
    run_cost: Callable[[int], tuple[float | None, str]],
    seed_sd: float | None = None,
) -> SeedPlan:
    """Seeds per cell for a difference of `delta` points at 80 % power (stats.seeds_needed) from the
    between-seed variance pooled over the table's cells (`seed_sd` when given; the prior
    stats.PRIOR_SEED_SD when no cell has two healthy seeds), at α/m for the m comparisons; and, per
    comparison, the runs its two cells lack and their GPU-hours (`run_cost(row)`: one run's GPU-hours
    and where the figure comes from)."""
    key = comparisons.key
    cells = summary[summary["kind"] == "cell"]
    variance, df = stats.pooled_variance(list(v.values()) for v in cells[f"{key}_values"])
    if seed_sd is not None:
        sd, source = seed_sd, "--seed-sd"
    elif df:
        sd, source = math.sqrt(variance), f"pooled over the cells' seeds, {df} df"
    else:
        sd = stats.PRIOR_SEED_SD
        source = (
            "no cell has two healthy seeds: the prior of reports/stats.py, the Fashion-MNIST recipe's "
            "spread over 3 seeds; --seed-sd sets another"
        )
    m = max(comparisons.count, 1)
    alpha = stats.ALPHA / m
    seeds = stats.seeds_needed(delta, math.sqrt(2) * sd, alpha)
    costs: dict[int, tuple[float | None, str]] = {}
    rows, missing = [], {}
    for i, c in comparisons.rows.iterrows():
        j = int(c["ref"])
        if j < 0 or j == i:
            continue
        add = {r: max(0, seeds - int(summary.at[r, f"{key}_n"])) for r in (i, j)}
        missing.update(add)
        hours, sources = 0.0, []
        for r, extra in add.items():
            if r not in costs:
                costs[r] = run_cost(r)
            one, where = costs[r]
            if extra:
                hours = None if hours is None or one is None else hours + extra * one
                sources.append(where)
        rows.append({"cell": summary.at[i, "label"], "vs": summary.at[j, "label"],
                     "seeds now": f"{int(summary.at[i, f'{key}_n'])} / {int(summary.at[j, f'{key}_n'])}",
                     "seeds needed": seeds, "runs to add": sum(add.values()),
                     "GPU-hours": "?" if hours is None else f"{hours:.3g}",
                     "source": "; ".join(dict.fromkeys(sources)) or "—"})  # fmt: skip
    total_hours: float | None = 0.0
    for r, extra in missing.items():
        one = costs[r][0]
        if extra:
            total_hours = None if total_hours is None or one is None else total_hours + extra * one
    return SeedPlan(delta, seeds, sd, source, alpha, pd.DataFrame(rows), sum(missing.values()), total_hours)
