"""A successive-halving search in the report: the pruned cells apart, and how well the rung ranked the runs.

The launcher's decision step tags each run that took part in a rung's decision (read by
reports/collect.py into `search:*` columns and `df.attrs["search"]`). A pruned run trained only to its
rung: it is never a result, so the report's tables, statistics and plots leave it out (`split`) and
list it apart, one row per pruned cell (`pruned_section`). Over the runs that reached the end, the
Spearman rank correlation between a rung's metric and the final one (`correlations`) says whether the
rung ranks runs like the final evaluation, i.e. whether pruning there could have dropped the best
cells; runs revived with `dinolab sweep submit FILE --only pruned` keep their rung tags and count.

A sweep without a search has none of the tags: nothing here changes its report.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

from reports import tables
from reports.collect import PRUNED

MIN_RHO = 0.5
"""Below this Spearman ρ a rung is said not to rank runs like the final evaluation."""
MIN_RUNS = 5
"""Fewer runs that reached the end than this: too few to judge a rung."""
LOW_RHO = (
    "the rung metric does not rank runs like the final evaluation: pruning at this rung may drop the best "
    "cells; use a later rung"
)
HEADING = "Pruned by successive halving"


def search_of(df: pd.DataFrame) -> dict | None:
    """The search the runs took part in ({metric, mode, rungs}), None for a plain sweep."""
    return df.attrs.get("search")


def split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs that can be results, the pruned runs); a revived run (tagged otherwise) is no longer pruned."""
    pruned = (df["state"] == PRUNED).to_numpy()
    return df[~pruned].reset_index(drop=True), df[pruned].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# The pruned cells
# --------------------------------------------------------------------------------------------------


def pruned_cells(pruned: pd.DataFrame, axes: list[str], search: dict | None) -> pd.DataFrame:
    """One row per pruned cell (its seeds were decided together): its axes, `pruned_at`, `value` (the
    cell's mean of the search metric at that rung: the tag, else the mean of its runs' rung values),
    `seeds` (its pruned runs) and `saved` (GPU-hours not spent, summed over them); best first within a rung."""
    if pruned.empty:
        return pd.DataFrame(columns=[*axes, "pruned_at", "value", "seeds", "saved"])
    rungs = list((search or {}).get("rungs") or [])
    frame = pruned.assign(
        pruned_at=_numeric(pruned, "search:pruned_at"),
        value=_numeric(pruned, "search:cell_value"),
        saved=_numeric(pruned, "search:saved_gpu_hours"),
    )
    rows = []
    for values, group in frame.groupby([*axes, "pruned_at"], sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip([*axes, "pruned_at"], values, strict=True))
        value = group["value"].dropna()
        if value.empty:  # no cell_value tag: the mean of the runs' own values at that rung
            at = row["pruned_at"]
            k = next((i for i, r in enumerate(rungs) if not pd.isna(at) and math.isclose(r, at)), None)
            own = group.get(f"search:rung{k}") if k is not None else None
            value = own.dropna() if own is not None else value
        row["value"] = float(value.mean()) if len(value) else math.nan
        row["seeds"] = len(group)
        row["saved"] = float(group["saved"].sum(min_count=1))
        rows.append(row)
    cells = pd.DataFrame(rows)
    best_first = (search or {}).get("mode", "max") != "min"
    order = cells.assign(_v=cells["value"] * (-1 if best_first else 1))
    return cells.loc[order.sort_values(["pruned_at", "_v"], na_position="last").index].reset_index(drop=True)


def total_line(cells: pd.DataFrame) -> str:
    """`6 cells pruned, 2.4 GPU-hours saved`."""
    n = len(cells)
    saved = cells["saved"].sum(min_count=1) if n else 0.0
    hours = "unknown" if pd.isna(saved) else f"{saved:.3g}"
    return f"{n} cell{'' if n == 1 else 's'} pruned, {hours} GPU-hours saved"


def pruned_section(
    pruned: pd.DataFrame, axes: list[str], search: dict | None, fmt: str, heading: bool = True
) -> str:
    """The pruned cells in `fmt`, under a heading (`heading`), with the total line ("" when nothing was
    pruned). CSV: a block of its own, one line per cell and a last line of kind `total`."""
    cells = pruned_cells(pruned, axes, search)
    if cells.empty:
        return ""
    search = search or {}
    metric = search.get("metric", "the rung metric")
    if fmt == "csv":
        frame = cells.assign(kind="pruned cell", metric=metric)[
            ["kind", *axes, "pruned_at", "metric", "value", "seeds", "saved"]
        ]
        total = {"kind": "total", "metric": metric, "seeds": int(cells["seeds"].sum()),
                 "saved": cells["saved"].sum(min_count=1)}  # fmt: skip
        frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
        frame = frame.rename(columns={"value": "cell_value", "seeds": "n_seeds", "saved": "saved_gpu_hours"})
        frame["n_seeds"] = frame["n_seeds"].astype("Int64")
        return frame.to_csv(index=False, float_format="%.6g")
    dash = "--" if fmt == "latex" else "—"
    view = pd.DataFrame({axis: cells[axis].map(str) for axis in axes})
    view["pruned at"] = cells["pruned_at"].map(lambda v: dash if pd.isna(v) else f"{v:g} of the schedule")
    view[f"{metric} (cell mean)"] = cells["value"].map(lambda v: dash if pd.isna(v) else f"{v:.4g}")
    view["seeds"] = cells["seeds"].map(str)
    view["GPU-hours saved"] = cells["saved"].map(lambda v: dash if pd.isna(v) else f"{v:.3g}")
    parts = [tables.export(view, fmt), _note(total_line(cells), fmt)]
    if heading:
        parts.insert(0, _plain(pruned_heading(search), fmt))
    return "\n\n".join(parts)


def pruned_heading(search: dict) -> str:
    """`Pruned by successive halving (monitor_knn_top1, higher is better; rungs 0.2, 1): never results, ...`"""
    rungs = ", ".join(str(r) for r in search.get("rungs") or [])
    better = "lower" if search.get("mode") == "min" else "higher"
    return (
        f"{HEADING} ({search.get('metric', 'the rung metric')}, {better} is better"
        + (f"; rungs {rungs}" if rungs else "")
        + "): never results, left out of the table, its statistics and plots:"
    )


# --------------------------------------------------------------------------------------------------
# Does the rung rank runs like the final evaluation?
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    rung: int  # k of dinolab.search.rung<k>
    fraction: float  # of the schedule (nan when the rungs are not tagged)
    rho: float  # Spearman, signed so that 1 is the same ranking (nan: undefined)
    n: int  # runs that reached the end with both values
    warning: str  # "" when the rung can be trusted

    def label(self) -> str:
        return f"rung {self.fraction:g}" if not math.isnan(self.fraction) else f"rung {self.rung}"


def correlations(df: pd.DataFrame, key: str, better: str, sweep_file: str = "") -> list[Correlation]:
    """Per non-final rung k, the Spearman ρ (scipy.stats.spearmanr) between the rung's value and the
    final `key` over the runs that reached the end (finished, not pruned, not flagged) with both; signed so that 1
    means both rank the runs alike (a `mode: min` rung metric or a `better: min` final column turn the
    sign). Warned: fewer than MIN_RUNS runs; else ρ below MIN_RHO (or undefined)."""
    search = search_of(df)
    if search is None or key not in df:
        return []
    from scipy.stats import spearmanr

    rungs = list(search.get("rungs") or [])
    sign = (-1 if search.get("mode") == "min" else 1) * (-1 if better == "min" else 1)
    # The table's healthy runs: a finished run the report flags (collapsed, diverged) is no result there,
    # so it does not judge the rung either.
    healthy = df["flag"].fillna("") == "" if "flag" in df else True
    ended = df[(df["state"] == "finished") & healthy & df[key].notna()]
    found = []
    for column in sorted((c for c in df.columns if c.startswith("search:rung")), key=lambda c: int(c[11:])):
        k = int(column[len("search:rung") :])
        both = ended[ended[column].notna()]
        n = len(both)
        rho = math.nan
        if n >= 2 and both[column].nunique() > 1 and both[key].nunique() > 1:
            rho = sign * float(spearmanr(both[column].astype(float), both[key].astype(float)).statistic)
        if n < MIN_RUNS:
            warning = (
                f"too few runs reached the end to judge the rung (n={n}); revive the pruned runs with "
                f"`dinolab sweep submit {sweep_file or 'FILE'} --only pruned` to measure it"
            )
        elif math.isnan(rho) or rho < MIN_RHO:
            warning = LOW_RHO
        else:
            warning = ""
        fraction = rungs[k] if k < len(rungs) else math.nan
        found.append(Correlation(k, fraction, rho, n, warning))
    return found


def correlation_line(c: Correlation, metric: str, header: str) -> str:
    """`rung 0.2 (monitor_knn_top1) → final k-NN top-1 (k=20): Spearman ρ = 0.83 over 9 runs`."""
    rho = "— (undefined)" if math.isnan(c.rho) else f"{c.rho:.2f}"
    return (
        f"{c.label()} ({metric}) → final {header}: Spearman ρ = {rho} over {c.n} run{'' if c.n == 1 else 's'}"
    )


def correlation_text(found: list[Correlation], search: dict, header: str, final: str, fmt: str) -> str:
    """The correlation lines in `fmt`, each rung's warning under its line ("" without rungs). CSV: a block
    of its own (rung, rung_fraction, rung_metric, final_metric, spearman_rho, n_runs, warning)."""
    if not found:
        return ""
    metric = search.get("metric", "the rung metric")
    if fmt == "csv":
        frame = pd.DataFrame([{"rung": c.rung, "rung_fraction": c.fraction, "rung_metric": metric,
                               "final_metric": final, "spearman_rho": c.rho, "n_runs": c.n,
                               "warning": c.warning} for c in found])  # fmt: skip
        return frame.to_csv(index=False, float_format="%.6g")
    parts = []
    for c in found:
        parts.append(_note(correlation_line(c, metric, header), fmt))
        if c.warning:
            parts.append(_warning(f"{c.label()}.", c.warning, fmt))
    return "\n\n".join(parts) if fmt == "markdown" else "\n".join(parts)


def _note(text: str, fmt: str) -> str:
    return tables.note_block(text, fmt, _latex)


def _plain(text: str, fmt: str) -> str:
    return html.escape(text) if fmt == "html" else _latex(text) if fmt == "latex" else text


def _warning(title: str, text: str, fmt: str) -> str:
    return tables.warning_block(title, text, fmt, _latex)


def _latex(text: str) -> str:
    text = tables._latex_text(text).replace("ρ", "$\\rho$").replace("→", "$\\rightarrow$")
    return text.replace("`", "\\texttt{", 1).replace("`", "}", 1) if text.count("`") == 2 else text


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series(math.nan, index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")
