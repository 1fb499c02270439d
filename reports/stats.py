"""The statistics of an ablation table: a cell's interval, a difference's interval and test, Holm's
correction over a table's comparisons, and the seeds a difference needs (scipy.stats, statsmodels).

Accuracies are in points (percent). A cell is the runs of one setting that ended healthy, one value
per seed, each a top-1 on the same `n_test` test images. Its mean estimates the setting's expected
top-1 over training seeds on the population the test images are drawn from, so its interval counts
two errors:

- the spread across seeds, s²/n (Student's t on the seeds' values);
- the test set's own sampling error: a top-1 on N images is a binomial proportion, variance
  p(1−p)/N. Every seed is scored on the *same* images, so this part does not shrink with more seeds
  and is added whole (it is counted as if shared by all seeds, which makes the interval slightly
  conservative: the part of it the seeds do not share is already in s²).

The two add; the t quantile takes the Welch–Satterthwaite degrees of freedom (the binomial part is
known, infinite df), and the interval is never narrower than the seeds' own t interval. Simulated
(tests/unit/test_report_stats.py), it covers the truth 95–97 % of the time where seeds spread as much
as the test set's error or more, and up to 98 % where seeds differ only in which test images they get
right (then the binomial part is counted twice). One seed: the binomial (Wilson) interval of that run alone. A difference between
two cells is taken on seed-paired differences where the seeds match (the same seed gives both runs
the same data order, augmentations and initial weights): the shared test set cancels in it, and what
the pairing does not cancel is in the spread of the differences, so it is a paired t-test
(`ttest_rel`), or Welch's when fewer than two seeds pair. With one seed per cell no difference is
tested: the spread across seeds is unknown.

Everything here works on numpy arrays over leading axes (the last axis is the seeds), so that
`tests/unit/test_report_stats.py` checks these very functions on 2,000 simulated tables at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
POWER = 0.8

PRIOR_SEED_SD = 3.4
"""Between-seed SD (points) to plan with when no cell has two healthy seeds: the spread of the
5-epoch Fashion-MNIST recipe's k-NN top-1 over seeds 0/1/2 (64.55, 70.05, 63.85; its gains over the
random init +4.0/+9.3/+2.95; docs/fashion-mnist-knn.md). Large for ImageNet-scale runs, where seeds
spread by tenths of a point: `dinolab report --seed-sd` sets another."""


@dataclass(frozen=True)
class Interval:
    """A cell: mean over healthy seeds and its interval (NaN bounds: none could be given)."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_test: int | None
    """Test images behind each value; None for a figure that is no proportion (img/s, memory)."""


@dataclass(frozen=True)
class Test:
    """A difference a − b with its interval, the test's p-value and how it was taken."""

    delta: float
    low: float
    high: float
    p: float
    n: int
    """Seed pairs (paired) or the smaller cell's seeds (unpaired); 0: not tested."""
    paired: bool
    why: str = ""
    """Why it was not tested ("1 seed"), else ""."""

    @property
    def tested(self) -> bool:
        return not math.isnan(self.p)


# --------------------------------------------------------------------------------------------------
# A cell
# --------------------------------------------------------------------------------------------------


def binomial_variance(mean, n_test):
    """Variance (points²) of a top-1 of `mean` points measured on `n_test` images: p(1−p)/N."""
    p = np.clip(np.asarray(mean, dtype=float) / 100, 0, 1)
    return 1e4 * p * (1 - p) / n_test


def satterthwaite(seed_var, df_seeds, known_var):
    """Welch–Satterthwaite degrees of freedom of seed_var + known_var, where `seed_var` (s²/n) has
    `df_seeds` and `known_var` (the binomial part) infinitely many."""
    seed_var, known_var = np.asarray(seed_var, float), np.asarray(known_var, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (seed_var + known_var) ** 2 / (seed_var**2 / df_seeds)
    return np.where(seed_var > 0, df, np.inf)


def mean_interval(values, n_test: int | None = None, confidence: float = CONFIDENCE):
    """(mean, low, high) over the last axis of `values` (two or more seeds, no NaN): Student's t on
    s²/n plus p(1−p)/N when `n_test` is given, with Welch–Satterthwaite df, and never narrower than
    the seeds' own t interval (s²/n on n − 1 df: the df the binomial part adds are not to be had
    where the seeds' spread already holds most of it); clipped to [0, 100] for a proportion."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = x.shape[-1]
    mean = x.mean(axis=-1)
    seed_var = x.var(axis=-1, ddof=1) / n
    known = binomial_variance(mean, n_test) if n_test else np.zeros_like(mean)
    tail = 0.5 + confidence / 2
    half = np.maximum(
        stats.t.ppf(tail, satterthwaite(seed_var, n - 1, known)) * np.sqrt(seed_var + known),
        stats.t.ppf(tail, n - 1) * np.sqrt(seed_var),
    )
    low, high = mean - half, mean + half
    if n_test:
        low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)
    return mean, low, high


def binomial_interval(top1, n_test: int, confidence: float = CONFIDENCE):
    """(low, high) in points: the Wilson interval of a top-1 of `top1` points on `n_test` images
    (statsmodels' `proportion_confint`)."""
    from statsmodels.stats.proportion import proportion_confint

    correct = np.rint(np.asarray(top1, dtype=float) / 100 * n_test)
    low, high = proportion_confint(correct, n_test, alpha=1 - confidence, method="wilson")
    return 100 * np.asarray(low), 100 * np.asarray(high)


def cell_interval(values, n_test: int | None = None, confidence: float = CONFIDENCE) -> Interval:
    """A cell's interval from its healthy seeds' values (NaN ignored): `mean_interval` for two or
    more, the Wilson interval for one (no interval when it is no proportion)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n_test = int(n_test) if n_test else None
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, n_test)
    if len(x) == 1:
        if not n_test:
            return Interval(float(x[0]), math.nan, math.nan, 1, None)
        low, high = binomial_interval(x[0], n_test, confidence)
        return Interval(float(x[0]), float(low), float(high), 1, n_test)
    mean, low, high = mean_interval(x, n_test, confidence)
    return Interval(float(mean), float(low), float(high), len(x), n_test)


# --------------------------------------------------------------------------------------------------
# A difference between two cells
# --------------------------------------------------------------------------------------------------


def paired(a, b, confidence: float = CONFIDENCE):
    """(delta, low, high, p) of a − b over the last axis, seed i of a paired with seed i of b:
    scipy's `ttest_rel` and its interval. Differences without spread are exact (p 0 or 1)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    delta = d.mean(axis=-1)
    flat = np.isclose(d.std(axis=-1), 0, atol=1e-12)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # the flat ones, replaced below
        res = stats.ttest_rel(a, b, axis=-1)
        ci = res.confidence_interval(confidence)
    p = np.where(flat, np.where(np.isclose(delta, 0), 1.0, 0.0), res.pvalue)
    return delta, np.where(flat, delta, ci.low), np.where(flat, delta, ci.high), p


def unpaired(a, b, confidence: float = CONFIDENCE):
    """(delta, low, high, p) of mean(a) − mean(b): Welch's t-test (scipy's `ttest_ind`,
    equal_var=False) for cells whose seeds do not pair."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = a.mean(axis=-1) - b.mean(axis=-1)
    flat = np.isclose(a.std(axis=-1) + b.std(axis=-1), 0, atol=1e-12)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, axis=-1, equal_var=False)
        ci = res.confidence_interval(confidence)
    p = np.where(flat, np.where(np.isclose(delta, 0), 1.0, 0.0), res.pvalue)
    return delta, np.where(flat, delta, ci.low), np.where(flat, delta, ci.high), p


def compare(a: dict, b: dict, confidence: float = CONFIDENCE) -> Test:
    """a − b for two cells given as {pairing key: value} (the key: the seed, and the value of every
    axis the table does not group by). Paired on the keys both have when two or more do; else
    Welch's test on all of both when each has two or more; else untested."""
    a = {k: v for k, v in a.items() if not math.isnan(v)}
    b = {k: v for k, v in b.items() if not math.isnan(v)}
    if not a or not b:
        return Test(math.nan, math.nan, math.nan, math.nan, 0, False, "no healthy seed")
    both = sorted(set(a) & set(b), key=str)
    if len(both) >= 2:
        delta, low, high, p = paired([a[k] for k in both], [b[k] for k in both], confidence)
        return Test(float(delta), float(low), float(high), float(p), len(both), True)
    delta = float(np.mean(list(a.values())) - np.mean(list(b.values())))
    if len(a) >= 2 and len(b) >= 2:
        _, low, high, p = unpaired(list(a.values()), list(b.values()), confidence)
        return Test(delta, float(low), float(high), float(p), min(len(a), len(b)), False)
    return Test(delta, math.nan, math.nan, math.nan, 0, False, "1 seed")


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values of a table's comparisons (statsmodels' `multipletests`); NaN (untested)
    stays NaN and does not count as a comparison."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        out[tested] = multipletests(p[tested], alpha=ALPHA, method="holm")[1]
    return out


def holm_confidence(p: float, p_holm: float, alpha: float = ALPHA) -> float:
    """The confidence level of a comparison's interval under Holm: 1 − alpha·p/p_holm, the level its
    step of the procedure tests at, so that the interval excludes 0 exactly when p_holm < alpha
    (1 − alpha with one comparison)."""
    if math.isnan(p) or math.isnan(p_holm) or p_holm <= 0:
        return 1 - alpha
    return 1 - alpha * min(p / p_holm, 1.0)


# --------------------------------------------------------------------------------------------------
# How many seeds a difference needs
# --------------------------------------------------------------------------------------------------


def pooled_variance(groups) -> tuple[float, int]:
    """(variance, degrees of freedom) of the seeds' values pooled across cells:
    Σ (n_i − 1) s_i² / Σ (n_i − 1) over cells with two or more; (NaN, 0) when none has."""
    num, df = 0.0, 0
    for values in groups:
        x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
        if len(x) >= 2:
            num += (len(x) - 1) * x.var(ddof=1)
            df += len(x) - 1
    return (num / df if df else math.nan), df


def seeds_needed(delta: float, sd_diff: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """Seeds per cell for a two-sided paired t-test at `alpha` to find a difference of `delta` points
    with probability `power`, when seed-paired differences have SD `sd_diff` (statsmodels'
    `TTestPower`); at least 2."""
    from statsmodels.stats.power import TTestPower

    if sd_diff <= 0:
        return 2
    n = TTestPower().solve_power(
        effect_size=abs(delta) / sd_diff, alpha=alpha, power=power, alternative="two-sided"
    )
    return max(2, math.ceil(float(np.asarray(n).item()) - 1e-9))
