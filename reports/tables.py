"""Ablation tables: one row per axis value, each number with its 95 % interval and its seeds;
Markdown, LaTeX, HTML or CSV.

Only healthy runs are results: finished, and no collapse or divergence flag. A run that collapsed,
diverged, failed or was stopped is left out of the means and counted ("n=2, 1 left out"); one still
pending or running is no result yet. The state column counts each run of a row once: finished, or
what it is doing (pending, running, preempted, failed), or its flag (collapse, divergence) in place
of its state; so an unfinished run shows as unfinished, never as a zero. A column's best is marked
only when it beats the runner-up by a resolved difference (reports/compare.py); a footnote says what
the intervals are and on what each figure's choices were made.

`--paper` puts the DINO paper's published numbers (ImageNet-1k; `../shared/ANCHORS.md`) beside a
table, each saying which table and schedule it comes from: our runs are usually shorter, so the
numbers are context, not targets. `page` is the self-contained report page: tables and figures (PNG
as data URIs) in one HTML file.
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import pandas as pd

from dino.eval.results import HEADLINE_K, KNN_HEADLINE_COLUMN, LINEAR_BEST_TOP1, LINEAR_TOP1
from reports import compare, stats
from reports.collect import n_test_column, protocol_of


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    better: str  # "max", "min" or "" (no best marked)
    digits: int


COLUMNS = (
    Column(KNN_HEADLINE_COLUMN, f"k-NN top-1 (k={HEADLINE_K})", "max", 1),
    Column(LINEAR_TOP1, "linear top-1", "max", 1),
    Column("img_per_s", "img/s per GPU", "max", 0),
    Column("memory_gib", "peak mem (GiB)", "min", 2),
    Column("gpu_hours", "GPU-hours", "min", 3),
    Column("epoch", "epochs", "", 2),
)
FORMATS = ("markdown", "latex", "html", "csv")
RANDOM_INIT = "baseline_random/"
"""Prefix of a run's random-init evaluation (`dinolab eval ... baseline=random`) in the runs' columns."""


# Columns of the runs' frame that are no metric (`--metric` does not offer them).
NOT_METRICS = ("run", "run_id", "mlflow_run_id", "flag", "run_dir", "code_hash", "est_source")
REPRO_FILE = "repro.json"
"""A run's reproducibility record in its run folder (dino/run/repro.py), linked from the runs table."""


class SelectionError(ValueError):
    """A figure chosen on the split it is reported on; says which and what to report instead."""


def columns_for(df: pd.DataFrame, metric: str) -> list[Column]:
    """The default columns, `metric` first; metric columns no run has are left out. A metric chosen
    on the test split it is measured on is refused (SelectionError)."""
    if metric not in df:
        known = ", ".join(c for c in df.columns if c not in NOT_METRICS and ":" not in c)
        raise KeyError(f"no metric '{metric}' in these runs; columns: {known}")
    selected_on(df, metric)  # refuses a figure chosen on the test split
    main = next((c for c in COLUMNS if c.key == metric), Column(metric, metric, "max", 2))
    return [main, *(c for c in COLUMNS if c.key != metric and c.key in df and df[c.key].notna().any())]


def selected_on(df: pd.DataFrame, key: str) -> str:
    """What the figure of column `key` was chosen on ("" for a figure that involves no choice of the
    evaluation's). Refuses (SelectionError) one chosen on the split it is reported on: the linear
    probe's best epoch (`linear_best_top1`) is picked by its test top-1."""
    name = key.removeprefix(RANDOM_INIT)
    if name == LINEAR_BEST_TOP1:
        raise SelectionError(
            f"{key}: the best epoch's top-1 is chosen on the test split it is reported on; report "
            f"{LINEAR_TOP1} (the final epoch, nothing chosen on test) instead"
        )
    found = protocol_of(key)
    if found is None:
        return ""
    if found[0] == "knn":
        return f"k fixed at {name.split('@')[1]}, nothing chosen"
    if name.startswith("linear_grid_lr"):
        return "one lr of the grid, final epoch: nothing chosen"
    chosen = df["chosen_on:linear"].dropna().unique() if "chosen_on:linear" in df else []
    if any("test" in c for c in chosen):
        raise SelectionError(f"{key}: the probe's lr was chosen on the test split it is reported on")
    if not len(chosen):
        return "final epoch; what its lr was chosen on is not recorded"
    return "final epoch; lr " + " / ".join(
        c if c.startswith("one lr") else f"chosen on the {c}" for c in chosen
    )


# --------------------------------------------------------------------------------------------------
# Runs -> cells
# --------------------------------------------------------------------------------------------------

LEFT_OUT_STATES = ("collapsed", "failed", "preempted", "diverged", "cancelled", "lost")


def healthy(df: pd.DataFrame) -> pd.Series:
    """Runs that count as results: finished, without a collapse or divergence flag."""
    return (df["state"] == "finished") & (df["flag"].fillna("") == "")


def left_out(df: pd.DataFrame) -> pd.Series:
    """Runs that ended without a result: collapsed, diverged, failed or stopped (not those still
    pending or running, unless already flagged)."""
    return (df["flag"].fillna("") != "") | df["state"].isin(LEFT_OUT_STATES)


def pairing_keys(df: pd.DataFrame, by: list[str]) -> list[tuple]:
    """What pairs a run with runs of other cells: its seed and its value of every axis the table
    does not group by (a run without a seed pairs with none)."""
    others = [a for a in df.attrs.get("axes", []) if a not in by and a in df]
    keys = []
    for i, row in df.iterrows():
        seed = row.get("seed")
        keys.append(("run", i) if seed is None or pd.isna(seed) else (int(seed), *(row[a] for a in others)))
    return keys


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


def cell_fields(key: str, values: dict, n_test: float | None) -> dict:
    """A cell's numbers for column `key` from {pairing key: value} of its healthy runs: `<key>` (the
    mean), `_low`, `_high` (95 % interval, reports/stats.py), `_n` (seeds), `_ntest` (test images, NaN:
    no proportion or unknown) and `_values`."""
    values = {k: float(v) for k, v in values.items() if v is not None and not math.isnan(v)}
    n_test = None if n_test is None or math.isnan(n_test) else int(n_test)
    cell = stats.cell_interval(list(values.values()), n_test)
    return {key: cell.mean, f"{key}_low": cell.low, f"{key}_high": cell.high, f"{key}_n": cell.n_seeds,
            f"{key}_ntest": math.nan if n_test is None else n_test, f"{key}_values": values}  # fmt: skip


def _n_test(group: pd.DataFrame, key: str) -> float | None:
    """Test images behind a cell's values: the fewest of its runs' (None: no proportion, or unknown)."""
    column = n_test_column(key)
    if column is None or column not in group:
        return None
    found = group.loc[group[key].notna(), column].dropna()
    return float(found.min()) if len(found) else None


def summarize(df: pd.DataFrame, by: list[str], columns: list[Column]) -> pd.DataFrame:
    """One row per cell (a combination of the `by` axes): `cell_fields` of each column over its healthy
    runs, `left_out`, `runs`, `state`, `label` and `kind` ("cell"); and, when the runs have random-init
    evaluations of a column, a last row of kind "random init" with them."""
    df = df.assign(_key=pairing_keys(df, by), _healthy=healthy(df).to_numpy(), _left=left_out(df).to_numpy())
    rows = []
    for values, group in df.groupby(by, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        row: dict = dict(zip(by, values, strict=True))
        good = group[group["_healthy"]]
        for col in columns:
            series = good[[col.key, "_key"]].dropna()
            row.update(cell_fields(col.key, dict(zip(series["_key"], series[col.key], strict=True)),
                                   _n_test(good, col.key)))  # fmt: skip
        row["left_out"] = int(group["_left"].sum())
        row["runs"] = len(group)
        row["state"] = state_summary(group)
        row["label"] = ", ".join(f"{a}={v}" for a, v in zip(by, values, strict=True))
        row["kind"] = "cell"
        rows.append(row)
    baseline = [c for c in columns if RANDOM_INIT + c.key in df and df[RANDOM_INIT + c.key].notna().any()]
    if baseline:
        row = {axis: ("random init" if i == 0 else "—") for i, axis in enumerate(by)}
        for col in columns:
            key = RANDOM_INIT + col.key
            if col not in baseline:
                row.update(cell_fields(col.key, {}, None))
                continue
            found = df[[key, "_key"]].dropna()
            by_key = found.groupby("_key", sort=False)[key].mean()  # one per seed: runs share inits
            row.update(cell_fields(col.key, by_key.to_dict(), _n_test(df, key)))
        row.update(left_out=0, runs=int(df[RANDOM_INIT + baseline[0].key].notna().sum()),
                   state="random init (baseline=random) of the runs' seeds", label="random init",
                   kind="random init")  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Cells -> text
# --------------------------------------------------------------------------------------------------


def _bold(text: str, fmt: str) -> str:
    return {"markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}", "html": f"<b>{text}</b>"}.get(
        fmt, text
    )


def _dash(fmt: str) -> str:
    return "--" if fmt == "latex" else "—"


def _cell(row: pd.Series, col: Column, fmt: str, best: bool, main: bool = True) -> str:
    """`65.0 [63.1, 66.9] (n=3)`, `60.5 [58.0, 63.0] (n=2, 1 left out)`, `67.3 [64.3, 70.1] (1 seed)`;
    how many runs were left out is said in the `main` column."""
    key, d = col.key, col.digits
    n = int(row[f"{key}_n"])
    left = int(row.get("left_out", 0) or 0) if main else 0
    tail = f", {left} left out" if left else ""
    if n == 0 or pd.isna(row[key]):
        return _dash(fmt) + (f" ({left} left out)" if left else "")
    text = f"{row[key]:.{d}f}"
    if best:
        text = _bold(text, fmt)
    low, high = row[f"{key}_low"], row[f"{key}_high"]
    interval = "" if pd.isna(low) else f" [{low:.{d}f}, {high:.{d}f}]"
    return f"{text}{interval} ({'1 seed' if n == 1 else f'n={n}'}{tail})"


def _delta_cell(c: pd.Series, digits: int, fmt: str) -> str:
    """`+4.4 [-9.0, 17.7] not resolved`, `+11.6 [1.2, 22.0] resolved`, `reference`."""
    if c["why"] == "reference":
        return "reference"
    if pd.isna(c["delta"]):
        return _dash(fmt) + (f" ({c['why']})" if c["why"] else "")
    delta = f"{c['delta']:+.{digits}f}"
    if pd.isna(c["p"]):
        return f"{delta} ({c['why']}) not resolved"
    verdict = "resolved" if c["resolved"] else "not resolved"
    return f"{delta} [{c['low']:.{digits}f}, {c['high']:.{digits}f}] {verdict}"


def _p_cell(c: pd.Series, fmt: str) -> str:
    if pd.isna(c["p_holm"]):
        return _dash(fmt)
    how = f"paired, {int(c['n'])} seeds" if c["paired"] else "unpaired, Welch"
    return f"{c['p_holm']:.2g} ({how})"


def footnote(
    df: pd.DataFrame, summary: pd.DataFrame, columns: list[Column], comparisons: compare.Comparisons | None
) -> list[str]:
    """What the table's numbers are: the intervals, what is left out, what bold means, the
    comparisons and their correction, and what each figure was selected on."""
    sizes = []
    for col in columns:
        if protocol_of(col.key):
            found = sorted({int(v) for v in summary[f"{col.key}_ntest"].dropna()})
            sizes.append(
                f"{col.header}: "
                + (" / ".join(f"{n:,}" for n in found) if found else "unknown (no result JSON: seeds only)")
            )
    lines = [
        "Cells: mean over the healthy seeds [95 % confidence interval] (seeds). The interval counts both "
        "the spread across seeds (Student's t on s²/n) and the evaluation's own sampling error, a top-1 "
        "on N test images being a binomial proportion (variance p(1−p)/N, counted whole since every seed "
        "is scored on the same images), with Welch–Satterthwaite degrees of freedom and never narrower "
        "than the seeds' own t interval; with 1 seed it is "
        "that run's Wilson binomial interval alone, which knows nothing of the spread across seeds. "
        + (f"N: {'; '.join(sizes)}. " if sizes else "")
        + "Figures that are no proportion (img/s, memory, GPU-hours, epochs) have the t interval over "
        "seeds alone, none with 1 seed.",
        "Collapsed, diverged, failed and stopped runs are never results: a cell's mean is over its "
        "healthy runs only and says how many were left out (the state column says why).",
        "Bold: a column's best, only where it beats the runner-up by a resolved difference (95 %, paired "
        "by seed where the seeds match); with 1 seed per cell nothing is bold.",
    ]
    if comparisons is not None:
        header = next(c.header for c in columns if c.key == comparisons.key)
        lines.append(
            f"Δ: each cell minus its reference ({comparisons.reference.text}) in {header}, on "
            "seed-paired differences where the seeds match (a run's seed fixes its data order, "
            "augmentations and initial weights, so same-seed runs share them and the shared test set "
            "cancels); a paired t-test, Welch's where fewer than 2 seeds pair; p Holm-corrected over "
            f"the table's {comparisons.tested} tested comparison(s), and each interval at the level "
            "Holm tests it at, so it excludes 0 exactly when the difference is resolved. With 1 seed "
            "per cell no difference is resolved: the spread across seeds is unknown."
        )
    chosen = [f"{c.header}: {text}" for c in columns if (text := selected_on(df, c.key))]
    if chosen:
        lines.append("Selected on: " + "; ".join(chosen) + ".")
    return lines


def render(
    summary: pd.DataFrame,
    by: list[str],
    columns: list[Column],
    fmt: str,
    with_paper: bool = False,
    comparisons: compare.Comparisons | None = None,
    notes: list[str] | tuple[str, ...] = (),
) -> str:
    """The table as text in `fmt`, `notes` (the footnote) under it; CSV is `csv_table`'s."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return csv_table(summary, by, columns, comparisons)
    out = pd.DataFrame({axis: summary[axis].map(str) for axis in by})
    for col in columns:
        best = compare.best_index(summary, col.key, col.better)
        out[col.header] = [_cell(r, col, fmt, i == best, col is columns[0]) for i, r in summary.iterrows()]
        if comparisons is not None and col.key == comparisons.key:
            rows = comparisons.rows
            delta = "$\\Delta$" if fmt == "latex" else "Δ"
            out[f"{delta} vs {comparisons.reference.text}"] = [
                _delta_cell(c, col.digits, fmt) for _, c in rows.iterrows()
            ]
            out[f"p (Holm, {comparisons.tested} tests)"] = [_p_cell(c, fmt) for _, c in rows.iterrows()]
    if with_paper:
        found = [_paper_numbers(by[0], v) for v in summary[by[0]]]
        dash = _dash(fmt)
        out["paper k-NN"] = [f"{p[0]:.1f}" if p and p[0] is not None else dash for p in found]
        out["paper linear"] = [f"{p[1]:.1f}" if p and p[1] is not None else dash for p in found]
        out["paper setting"] = [p[2] if p else dash for p in found]
    out["state"] = summary["state"]
    if fmt == "markdown":
        table = out.to_markdown(index=False, disable_numparse=True)
        return "\n\n".join([table, *notes]) if notes else table
    if fmt == "html":
        table = out.to_html(index=False, escape=False, border=0, classes="ablation")
        return table + "".join(f"\n{note_block(n, fmt)}" for n in notes)
    latex = out.rename(columns=lambda c: c.replace("_", "\\_").replace("%", "\\%"))
    latex = latex.map(lambda v: v.replace("_", "\\_") if isinstance(v, str) and "$" not in v else v)
    table = latex.to_latex(
        index=False, escape=False, column_format="l" * len(by) + "r" * (len(out.columns) - len(by))
    )
    return table + "".join(f"\n{note_block(n, fmt)}" for n in notes)


def note_block(text: str, fmt: str, latex: Callable[[str], str] | None = None) -> str:
    """A note under a table in `fmt` (markdown: the text); `latex` escapes it (default `_latex_text`)."""
    if fmt == "html":
        return f"<p class='note'>{html.escape(text)}</p>"
    if fmt == "latex":
        return f"\\par\\smallskip{{\\footnotesize {(latex or _latex_text)(text)}}}"
    return text


def warning_block(title: str, text: str, fmt: str, latex: Callable[[str], str] | None = None) -> str:
    """A visible warning in `fmt`: `title` in bold, then `text` with a capital first letter."""
    text, escape = text[0].upper() + text[1:], latex or _latex_text
    if fmt == "html":
        return f"<p class='warning'><b>Warning: {html.escape(title)}</b> {html.escape(text)}</p>"
    if fmt == "latex":
        return f"\\par\\noindent{{\\footnotesize\\textbf{{Warning: {escape(title)}}} {escape(text)}}}\\par\\smallskip"
    return f"> **Warning: {title}** {text}"


def _latex_text(text: str) -> str:
    for plain, tex in (("%", "\\%"), ("_", "\\_"), ("Δ", "$\\Delta$"), ("²", "$^2$"), ("−", "$-$"),
                       ("√", "$\\surd$"), ("&", "\\&")):  # fmt: skip
        text = text.replace(plain, tex)
    return text


def _latex_plain(text: str) -> str:
    """Plain text (a run name, an axis, a header) safe in LaTeX; text already in LaTeX is kept."""
    if "\\" in text or "$" in text:
        return text
    for plain, tex in (("%", "\\%"), ("_", "\\_"), ("&", "\\&"), ("#", "\\#")):
        text = text.replace(plain, tex)
    return text


def csv_table(
    summary: pd.DataFrame, by: list[str], columns: list[Column], comparisons: compare.Comparisons | None
) -> str:
    """Tidy CSV: one line per cell and column: mean, ci_low, ci_high, n_seeds, n_left_out, n_test,
    best, and for the compared column the difference to the reference (diff, diff_ci_low,
    diff_ci_high at diff_level), p, p_holm, resolved, paired; the cell's state."""
    lines = []
    for col in columns:
        best = compare.best_index(summary, col.key, col.better)
        for i, r in summary.iterrows():
            line = {axis: r[axis] for axis in by}
            line.update(kind=r["kind"], metric=col.key, mean=r[col.key], ci_low=r[f"{col.key}_low"],
                        ci_high=r[f"{col.key}_high"], n_seeds=int(r[f"{col.key}_n"]), n_left_out=int(r["left_out"]),
                        n_test=r[f"{col.key}_ntest"], best=i == best)  # fmt: skip
            c = comparisons.rows.loc[i] if comparisons is not None and col.key == comparisons.key else None
            line.update(
                vs=comparisons.reference.text
                if c is not None and c["why"] != "reference" and c["ref"] >= 0
                else "",
                diff=c["delta"] if c is not None else math.nan,
                diff_ci_low=c["low"] if c is not None else math.nan,
                diff_ci_high=c["high"] if c is not None else math.nan,
                diff_level=c["level"] if c is not None else math.nan,
                p=c["p"] if c is not None else math.nan,
                p_holm=c["p_holm"] if c is not None else math.nan,
                resolved=bool(c["resolved"]) if c is not None else "",
                paired=bool(c["paired"]) if c is not None and not pd.isna(c["p"]) else "",
                state=r["state"],
            )
            lines.append(line)
    frame = pd.DataFrame(lines)
    frame["n_test"] = frame["n_test"].astype("Int64")
    return frame.to_csv(index=False, float_format="%.6g")


def pivot(summary: pd.DataFrame, by: list[str], col: Column, fmt: str) -> str:
    """Two axes: the cells of one metric with the first axis down and the second across."""
    cells = summary[summary["kind"] == "cell"]
    cells = cells.assign(cell=[_cell(r, col, fmt, False) for _, r in cells.iterrows()])
    table = cells.pivot(index=by[0], columns=by[1], values="cell").fillna(_dash(fmt))
    table.columns = [f"{by[1]}={c}" for c in table.columns]
    table = table.reset_index()
    return export(table, fmt)


def runs_table(df: pd.DataFrame, by: list[str], columns: list[Column], fmt: str) -> str:
    """One row per run: name, axes, seed, state, flag and the report's metric columns; beside
    gpu_hours, the estimate the run was submitted with and its source, when runs have one; the code
    hash when runs have one; last, a link to the run's repro.json."""
    keys = [c.key for c in columns]
    if "est_gpu_hours" in df and df["est_gpu_hours"].notna().any():
        at = keys.index("gpu_hours") + 1 if "gpu_hours" in keys else len(keys)
        keys[at:at] = ["est_gpu_hours", "est_source"]
    coded = "code_hash" in df and df["code_hash"].notna().any()
    view = df[["run", *by, "seed", "state", "flag", *keys]]
    if coded:  # a run without one started before code hashes were kept
        view = view.assign(code_hash=df["code_hash"] if fmt == "csv" else df["code_hash"].fillna(_dash(fmt)))
    if "run_dir" in df:
        view = view.assign(repro=[repro_link(d, fmt) for d in df["run_dir"]])
    return export(view, fmt, floats=".3g")


def repro_link(run_dir: object, fmt: str) -> str:
    """A link to `<run_dir>/repro.json` in `fmt` (a dash when the run's folder is unknown). HTML: an
    <a href> (file:// for a local absolute path); Markdown: a link; LaTeX: the path; CSV: the path."""
    if not isinstance(run_dir, str) or not run_dir:
        return _dash(fmt)
    path = run_dir.rstrip("/") + "/" + REPRO_FILE
    if fmt == "html":
        href = path if "://" in path or not path.startswith("/") else "file://" + quote(path)
        return f'<a href="{html.escape(href)}">{REPRO_FILE}</a>'
    if fmt == "markdown":
        return f"[{REPRO_FILE}](<{path}>)"
    if fmt == "latex":
        return "\\texttt{" + _latex_text(path.replace("#", "\\#").replace("$", "\\$")) + "}"
    return path


def mixed_code(df: pd.DataFrame) -> str:
    """A warning when the runs of a table trained with more than one code version (their
    `dinolab.code_hash` tags), naming each hash and its runs; "" when they agree. A run without a
    code hash (started before it was recorded) is not counted as different."""
    known = df["code_hash"].dropna() if "code_hash" in df else pd.Series([], dtype=object)
    counts = Counter(str(h) for h in known if str(h))
    if len(counts) < 2:
        return ""
    listed = ", ".join(f"{h} ({n} run{'s' if n > 1 else ''})"
                       for h, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))  # fmt: skip
    untagged = len(df) - sum(counts.values())
    tail = f"; {untagged} run(s) without a code hash not compared" if untagged else ""
    return (
        f"the runs of this table trained with {len(counts)} different code versions: code {listed}{tail}. "
        "A difference between cells may come from the code rather than the ablation; each run's "
        "repro.json says what it ran (docs/reproducibility.md)."
    )


def with_warning(text: str, warning: str, fmt: str) -> str:
    """`text` (a table in `fmt`) with `warning` as a visible note above it; CSV stays plain CSV (the
    command prints the warning on stderr)."""
    if not warning or fmt == "csv":
        return text
    block = warning_block("mixed code.", warning, fmt)
    if fmt == "markdown":
        return f"{block}\n\n{text}"
    if fmt == "html":
        return f"{block}\n{text}"
    return f"% dinolab report: warning: mixed code: {warning}\n{block}\n{text}"  # as the command prints it on stderr


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
    if fmt == "latex":  # cells made for LaTeX (a backslash or $ in them) are kept as they are
        frame = frame.rename(columns=_latex_plain).map(lambda v: _latex_plain(v) if isinstance(v, str) else v)
        return frame.to_latex(index=False, escape=False, float_format=floats and f"%{floats}")
    if fmt == "html":
        return frame.to_html(
            index=False, escape=False, border=0, na_rep="—", float_format=floats and f"%{floats}"
        )
    if fmt == "csv":
        return frame.to_csv(index=False)
    return frame.to_markdown(index=False, disable_numparse=floats is None, floatfmt=floats or "g")


# ---- the paper's numbers ----------------------------------------------------------------------------
# axis -> value -> (k-NN top-1, linear top-1, source); None where the paper gives no number.
_PAPER: dict[str, dict[object, tuple[float | None, float | None, str]]] = {
    "crops.num_local": {
        0: (None, 67.8, "Table 8, ViT-S/16, 100 ep"),
        2: (None, 71.5, "Table 8, ViT-S/16, 100 ep"),
        6: (None, 73.8, "Table 8, ViT-S/16, 100 ep"),
        10: (None, 74.6, "Table 8, ViT-S/16, 100 ep"),
    },
    "model.patch_size": {
        16: (74.5, 77.0, "Table 2, ViT-S/16, full schedule"),
        8: (78.3, 79.7, "Table 2, ViT-S/8, full schedule"),
    },
    "teacher.temp": {
        0.02: (66.7, None, "teacher temperature, ViT-S/16, 100 ep"),
        0.04: (69.6, None, "teacher temperature, ViT-S/16, 100 ep"),
        0.06: (68.7, None, "teacher temperature, ViT-S/16, 100 ep"),
        0.08: (0.1, None, "teacher temperature, ViT-S/16, 100 ep (collapse)"),
    },
    "teacher.center_momentum": {
        0.0: (69.1, None, "center momentum, ViT-S/16, 100 ep"),
        0.9: (69.7, None, "center momentum, ViT-S/16, 100 ep"),
        0.999: (0.1, None, "center momentum, ViT-S/16, 100 ep (collapse)"),
    },
    "teacher.momentum": {
        0.0: (0.1, 0.1, "Table 7, no momentum teacher (collapse), 300 ep"),
        0.996: (72.8, 76.1, "Table 7, DINO ViT-S/16, 300 ep"),
    },
}


def _paper_numbers(axis: str, value: object) -> tuple[float | None, float | None, str] | None:
    table = _PAPER.get(axis, {})
    for key, numbers in table.items():
        try:
            if float(key) == float(value):  # 0.9 == "0.9", 2 == 2.0
                return numbers
        except (TypeError, ValueError):
            if key == value:
                return numbers
    return None


# ---- the report page ---------------------------------------------------------------------------------
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table.ablation,table{border-collapse:collapse;font-size:14px}td,th{padding:4px 10px;border-bottom:1px solid #ddd;
text-align:right}th{background:#f4f4f4}img{max-width:100%;margin:1em 0}.note{color:#555}
.warning{color:#a40000;border-left:4px solid #a40000;padding-left:8px}"""


def page(title: str, sections: list[tuple[str, str]], figures: list[tuple[str, bytes]], note: str) -> str:
    """`sections`: (heading, table HTML); `figures`: (caption, PNG bytes)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(note)}</p>"]  # fmt: skip
    for heading, table in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{table}")
    for caption, png in figures:
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)
