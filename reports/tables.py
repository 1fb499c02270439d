"""Ablation tables: one row per axis value, mean ± std over seeds, n; Markdown, LaTeX, HTML or CSV.

Only runs whose training finished enter the means (n=), a run whose final metrics flag a collapse
included: its accuracy is what that setting gave. The state column counts each run of a row once:
finished, or what it is doing (pending, running, preempted, failed), or its flag (collapse,
divergence) in place of its state; so an unfinished run shows as unfinished, never as a zero.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from dino.eval.results import KNN_HEADLINE_COLUMN, LINEAR_TOP1
from reports import paper


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    better: str  # "max", "min" or "" (no best marked)
    digits: int


COLUMNS = (
    Column(KNN_HEADLINE_COLUMN, "k-NN top-1 (k=20)", "max", 1),
    Column(LINEAR_TOP1, "linear top-1", "max", 1),
    Column("img_per_s", "img/s per GPU", "max", 0),
    Column("memory_gib", "peak mem (GiB)", "min", 2),
    Column("gpu_hours", "GPU-hours", "min", 3),
    Column("epoch", "epochs", "", 2),
)
FORMATS = ("markdown", "latex", "html", "csv")


def columns_for(df: pd.DataFrame, metric: str) -> list[Column]:
    """The default columns, `metric` first; metric columns no run has are left out."""
    if metric not in df:
        known = ", ".join(c for c in df.columns if c not in ("run", "run_id", "mlflow_run_id", "flag"))
        raise KeyError(f"no metric '{metric}' in these runs; columns: {known}")
    main = next((c for c in COLUMNS if c.key == metric), Column(metric, metric, "max", 2))
    return [main, *(c for c in COLUMNS if c.key != metric and c.key in df and df[c.key].notna().any())]


def state_summary(group: pd.DataFrame) -> str:
    """How many runs of a group are in which state, each run counted once: a flagged run (collapse,
    divergence) under its flag, not also under its state ("2 finished; 1 collapsed (uniform)"); one
    still going says so ("1 running and diverged (NaN loss)")."""
    states: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    for state, flag in zip(group["state"], group["flag"], strict=True):
        if not flag:
            states[state] += 1
        elif state in ("finished", "collapsed"):  # training is over: the flag says how it ended
            flagged[flag] += 1
        else:
            flagged[f"{state} and {flag}"] += 1
    text = ", ".join(
        f"{n} {s}" for s, n in sorted(states.items(), key=lambda kv: (kv[0] != "finished", kv[0]))
    )
    flags = ", ".join(f"{n} {f}" for f, n in sorted(flagged.items()))
    return "; ".join(part for part in (text, flags) if part)


def summarize(df: pd.DataFrame, by: list[str], columns: list[Column]) -> pd.DataFrame:
    """Numbers per group: `<key>` mean, `<key>_std`, `<key>_n` over finished runs, and `state`."""
    rows = []
    for values, group in df.groupby(by, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(by, values, strict=True))
        done = group[group["state"] == "finished"]
        for col in columns:
            series = done[col.key].dropna()
            row[col.key] = series.mean() if len(series) else float("nan")
            row[f"{col.key}_std"] = series.std(ddof=1) if len(series) > 1 else float("nan")
            row[f"{col.key}_n"] = len(series)
        row["runs"] = len(group)
        row["state"] = state_summary(group)
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, n: int, digits: int, fmt: str, best: bool) -> str:
    if n == 0 or pd.isna(mean):
        return "—" if fmt != "latex" else "--"
    pm = " $\\pm$ " if fmt == "latex" else " ± "
    text = f"{mean:.{digits}f}"
    if n > 1 and not pd.isna(std):
        text += f"{pm}{std:.{digits}f}"
    if best:
        text = {"markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}", "html": f"<b>{text}</b>"}.get(
            fmt, text
        )
    return f"{text} (n={n})" if n > 1 else text


def _best_index(summary: pd.DataFrame, col: Column):
    values = summary[col.key].where(summary[f"{col.key}_n"] > 0)
    if not col.better or values.notna().sum() < 2:
        return None
    return values.idxmax() if col.better == "max" else values.idxmin()


def render(
    summary: pd.DataFrame, by: list[str], columns: list[Column], fmt: str, with_paper: bool = False
) -> str:
    """The table as text in `fmt`; the best value of each column marked (bold) when 2+ rows have one."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return summary.to_csv(index=False)
    out = pd.DataFrame({axis: summary[axis].map(str) for axis in by})
    for col in columns:
        best = _best_index(summary, col)
        out[col.header] = [
            _cell(r[col.key], r[f"{col.key}_std"], int(r[f"{col.key}_n"]), col.digits, fmt, i == best)
            for i, r in summary.iterrows()
        ]
    if with_paper:
        found = [paper.lookup(by[0], v) for v in summary[by[0]]]
        dash = "—" if fmt != "latex" else "--"
        out["paper k-NN"] = [f"{p[0]:.1f}" if p and p[0] is not None else dash for p in found]
        out["paper linear"] = [f"{p[1]:.1f}" if p and p[1] is not None else dash for p in found]
        out["paper setting"] = [p[2] if p else dash for p in found]
    out["state"] = summary["state"]
    if fmt == "markdown":
        return out.to_markdown(index=False, disable_numparse=True)
    if fmt == "html":
        return out.to_html(index=False, escape=False, border=0, classes="ablation")
    latex = out.rename(columns=lambda c: c.replace("_", "\\_").replace("%", "\\%"))
    latex = latex.map(lambda v: v.replace("_", "\\_") if isinstance(v, str) and "$" not in v else v)
    return latex.to_latex(
        index=False, escape=False, column_format="l" * len(by) + "r" * (len(out.columns) - len(by))
    )


def pivot(summary: pd.DataFrame, by: list[str], col: Column, fmt: str) -> str:
    """Two axes: the mean of one metric with the first axis down and the second across."""
    cells = summary.assign(
        cell=[
            _cell(r[col.key], r[f"{col.key}_std"], int(r[f"{col.key}_n"]), col.digits, fmt, False)
            for _, r in summary.iterrows()
        ]  # fmt: skip
    )
    table = cells.pivot(index=by[0], columns=by[1], values="cell").fillna("—")
    table.columns = [f"{by[1]}={c}" for c in table.columns]
    table = table.reset_index()
    return export(table, fmt)


def runs_table(df: pd.DataFrame, by: list[str], columns: list[Column], fmt: str) -> str:
    """One row per run: name, axes, seed, state, flag and the report's metric columns; beside
    gpu_hours, the estimate the run was submitted with and its source, when runs have one."""
    keys = [c.key for c in columns]
    if "est_gpu_hours" in df and df["est_gpu_hours"].notna().any():
        at = keys.index("gpu_hours") + 1 if "gpu_hours" in keys else len(keys)
        keys[at:at] = ["est_gpu_hours", "est_source"]
    view = df[["run", *by, "seed", "state", "flag", *keys]]
    return export(view, fmt, floats=".3g")


def collapsed_table(df: pd.DataFrame, fmt: str) -> str:
    """The runs the collapse guard stopped early: where, why, and the GPU-hours not spent ("" when
    none). Saved GPU-hours are estimated as spent x (planned - stopped) / stopped: the run's own
    rate, over the steps it did not run (planned = the run's total steps)."""
    stopped = df[df["state"] == "collapsed"]
    if stopped.empty:
        return ""
    spent, step, total = stopped["gpu_hours"], stopped["collapse_step"], stopped["total_steps"]
    view = pd.DataFrame(
        {
            "collapsed run": stopped["run"],
            "stopped at step": step.map(lambda v: "—" if pd.isna(v) else f"{v:.0f}"),
            "planned steps": total.map(lambda v: "—" if pd.isna(v) else f"{v:.0f}"),
            "GPU-hours spent": spent.map(lambda v: "—" if pd.isna(v) else f"{v:.3g}"),
            "GPU-hours saved (est.)": (spent * (total - step) / step).map(
                lambda v: "—" if pd.isna(v) else f"{v:.3g}"
            ),
            "flag": stopped["flag"],
        }
    )
    return export(view, fmt)


def export(frame: pd.DataFrame, fmt: str, floats: str | None = None) -> str:
    """A plain table (cells already formatted unless `floats` is given) in one of FORMATS."""
    if fmt == "latex":
        return frame.to_latex(index=False, escape=False, float_format=floats and f"%{floats}")
    if fmt == "html":
        return frame.to_html(
            index=False, escape=False, border=0, na_rep="—", float_format=floats and f"%{floats}"
        )
    if fmt == "csv":
        return frame.to_csv(index=False)
    return frame.to_markdown(index=False, disable_numparse=floats is None, floatfmt=floats or "g")
