"""`dinolab report [sweep.yaml] [--experiment E --tracking-uri U]`: the ablation table of a sweep,
from MLflow alone (Markdown, LaTeX, HTML or CSV), optionally with the paper's numbers and an HTML
page with plots."""

from __future__ import annotations

import argparse
import os
import sys

from dino.eval.results import EVAL_COLUMNS, HEADLINE_K, KNN_HEADLINE_COLUMN, MONITOR_TOP1

EPILOG = """\
The table has one row per ablation value: the mean over healthy seeds with its 95 % interval (spread
across seeds plus the test set's binomial error; "1 seed": the binomial alone) and how many seeds, and
how many runs were left out (collapsed, diverged, failed, stopped); the state of the runs; a column's
best in bold only when it beats the runner-up by a resolved difference; a footnote saying what the
intervals are and what each figure was selected on. Runs stopped early are listed with their step and
the GPU-hours saved. The runs table (--runs, and the HTML page) links each run's repro.json (what it
ran: code, packages, hosts, SLURM job, seeds). Runs that trained with different code (their
dinolab.code_hash tags) get a warning naming each hash and its runs, on stderr and above the table.

A successive-halving search (the sweep file's search:): runs pruned at a rung are never results; they
are left out of the table, its statistics and plots and listed apart, one row per pruned cell with the
rung, the cell's metric there, its seeds and the GPU-hours saved. Under the table, per rung, the
Spearman rank correlation between the rung's metric and the final one over the runs that reached the
end, with a warning when it is below 0.5 or rests on fewer than 5 runs (revive the pruned runs with
`dinolab sweep submit FILE --only pruned` to measure it over the whole grid).

--vs AXIS=VALUE (default: the sweep file's baseline:) adds each cell's difference to that reference
cell, seed-paired, Holm-corrected, marked resolved or not resolved. --resolve POINTS prints the seeds
per cell a difference of POINTS needs at 80 % power and what the missing runs cost in GPU-hours.

Metrics: knn_top1@20 (default), knn_top1@10/100/200, knn_top5@k, linear_top1 (final epoch; an lr grid
is chosen on held-out train images), img_per_s, memory_gib, gpu_hours, epoch, loss, teacher_entropy.
linear_best_top1 (the best epoch, as the paper reports) is picked on the test split it is measured on,
and refused.

A report only reads: a sweep that has not run (no SQLite store yet), an unknown experiment or one
without runs is one line and exit code 2, and nothing is created.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="ablation tables and plots of a sweep, from MLflow", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("sweep_file", nargs="?", help="the sweep (its name is the experiment, its root the store)")
    p.add_argument("overrides", nargs="*", help="sweep file edits, e.g. root=/tmp/x")
    p.add_argument("--experiment", help="MLflow experiment (default: the sweep's name)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the sweep's, else $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--metric", default=KNN_HEADLINE_COLUMN, help=f"the main column (default {KNN_HEADLINE_COLUMN})"
    )
    p.add_argument(
        "--by", action="append", default=[], help="axis to group by (repeat for two; default: all)"
    )
    p.add_argument("--format", default="markdown", choices=["markdown", "latex", "html", "csv"])
    p.add_argument("-o", "--output", help="write the table to this file instead of the terminal")
    p.add_argument(
        "--html", metavar="PATH", help="also write a self-contained HTML page with tables and plots"
    )
    p.add_argument(
        "--vs",
        metavar="AXIS=VALUE[,AXIS=VALUE]",
        help="compare every cell with this reference cell (axes left out vary with the cell), e.g. "
        "teacher.momentum=0.996; random-init: with the runs' random-init evaluation; none: no "
        "comparison (default: the sweep file's baseline:)",
    )
    p.add_argument(
        "--resolve",
        type=float,
        metavar="POINTS",
        help="seeds per cell needed to resolve a difference of POINTS with 80%% power, per comparison, "
        "and the GPU-hours of the missing runs",
    )
    p.add_argument(
        "--seed-sd",
        type=float,
        metavar="POINTS",
        help="between-seed SD to plan --resolve with (default: pooled over the cells' seeds; with one "
        "seed per cell, 3.4: the Fashion-MNIST recipe's spread over 3 seeds)",
    )
    p.add_argument("--paper", action="store_true", help="add the DINO paper's numbers for matching rows")
    p.add_argument("--runs", action="store_true", help="also print one row per run")
    p.add_argument(
        "--with",
        dest="with_weights",
        action="append",
        default=[],
        metavar="PATH[,PATH]",
        help="add a row per weights file (or its eval run.dir) from its `dinolab eval ... weights=` "
        "results on the sweep's data, e.g. the released ViT-S/16",
    )
    p.set_defaults(func=run_command)


def _source(args: argparse.Namespace) -> tuple[str, str, list[str], str, object]:
    """(tracking URI, experiment, default axes, sweep folder or "", the sweep or None)."""
    from dino.io.mlflow_store import missing_store
    from launcher.errors import UserError

    if args.sweep_file:
        from launcher.sweep_file import load_sweep

        sweep = load_sweep(args.sweep_file, args.overrides)
        uri = args.tracking_uri or sweep.tracking_uri
        if not uri:
            raise UserError(f"sweep {args.sweep_file} has tracking_uri none: nothing was tracked")
        if missing_store(uri):  # a report creates nothing (MLflow would create the store and its folder)
            submit = " ".join(["dinolab sweep submit", args.sweep_file, *args.overrides])
            raise UserError(f"no MLflow store at {uri}: the sweep has not run (submit it first: {submit})")
        return uri, args.experiment or sweep.name, [*sweep.grid, *sweep.zip], sweep.folder, sweep
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not (uri and args.experiment):
        raise UserError("name a sweep file, or --experiment with --tracking-uri (or $MLFLOW_TRACKING_URI)")
    return uri, args.experiment, [], "", None


def run_command(args: argparse.Namespace) -> int:
    from launcher.errors import UserError
    from reports import compare, search, tables
    from reports.collect import ReportError, collect

    uri, experiment, axes, folder, sweep = _source(args)
    try:
        every = collect(uri, experiment)
    except ReportError as err:
        raise UserError(str(err)) from None
    df, pruned = search.split(every)  # a run pruned by successive halving is never a result
    if df.empty:
        raise UserError(
            f"all {len(pruned)} runs of experiment '{experiment}' were pruned: no result to tabulate"
        )
    by = args.by or [a for a in axes if a in df.columns] or df.attrs["axes"]
    missing = [a for a in by if a not in df.columns]
    if missing or not by:
        raise UserError(
            f"--by {missing[0] if missing else '?'}: the runs have axes {', '.join(df.attrs['axes'])}"
        )
    try:
        columns = tables.columns_for(df, args.metric)
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    except tables.SelectionError as err:
        raise UserError(f"--metric {err}") from None
    summary = tables.summarize(df, by, columns)
    shown = _with_weights(args, summary, by, columns)
    try:
        comparisons = _comparisons(args, sweep, shown, by, columns[0])
        plan = _plan(args, sweep, df, shown, by, comparisons) if args.resolve is not None else None
    except compare.CompareError as err:
        raise UserError(str(err)) from None
    notes = tables.footnote(df, shown, columns, comparisons)
    if len(pruned):
        notes.append(
            f"{len(pruned)} run(s) pruned by successive halving trained only to a rung: never results, they are "
            f"left out of this table, its statistics and plots, and listed under '{search.HEADING}'."
        )
    text = tables.render(shown, by, columns, args.format, with_paper=args.paper, comparisons=comparisons,
                         notes=notes)  # fmt: skip
    ranked = search.correlations(df, columns[0].key, columns[0].better, args.sweep_file or "")
    for found in ranked:
        if found.warning:
            print(f"dinolab report: warning: {found.label()}: {found.warning}", file=sys.stderr)
    ranking = search.correlation_text(ranked, search.search_of(df) or {}, columns[0].header, columns[0].key,
                                      args.format)  # fmt: skip
    if ranking and args.format != "csv":  # under the table (CSV: a block of its own, last)
        text += "\n\n" + ranking
    mixed = tables.mixed_code(df)  # runs of this table trained with different code
    if mixed:
        print(f"dinolab report: warning: mixed code: {mixed}", file=sys.stderr)
        text = tables.with_warning(text, mixed, args.format)
    if len(by) == 2 and args.format != "csv":
        text += "\n\n" + tables.pivot(summary, by, columns[0], args.format)
    if plan is not None:
        if args.format == "csv":
            text += "\n" + plan.table.to_csv(index=False)
        else:
            text += "\n\n" + "\n".join(plan.lines()) + "\n\n" + tables.export(plan.table, args.format)
    if args.runs:  # every run, a pruned one with its state
        text += "\n\n" + tables.runs_table(every, by, columns, args.format)
    stopped = tables.collapsed_table(df, args.format)
    if stopped:  # saved = spent x (planned - stopped) / stopped steps
        text += (
            "\n\nStopped early by the collapse guard (saved = spent x unrun steps / run steps):\n\n" + stopped
        )
    cut = search.pruned_section(pruned, df.attrs["axes"], search.search_of(every), args.format)
    if cut:
        text += ("\n" if args.format == "csv" else "\n\n") + cut
    if ranking and args.format == "csv":
        text += "\n" + ranking
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"table written to {args.output}", file=sys.stderr)
    else:
        print(text)
    if args.html:
        write_html(args.html, uri, experiment, df, summary, by, columns, args.paper, shown, comparisons, notes,
                   plan, every=every, ranking=search.correlation_text(ranked, search.search_of(df) or {},
                                                                       columns[0].header, columns[0].key, "html"))  # fmt: skip
        print(f"HTML report written to {args.html}", file=sys.stderr)
    for path in filter(None, (args.output, args.html)):
        _attach(folder, path)
    return 0


def _comparisons(args: argparse.Namespace, sweep, summary, by, main):
    """Each cell against `--vs` (else the sweep's baseline:), or None without a reference."""
    from reports import compare

    if args.vs and args.vs.strip() == "none":
        return None
    if args.vs:
        ref = compare.Reference.parse(args.vs)
    elif sweep is not None and sweep.baseline:
        ref = compare.Reference(dict(sweep.baseline))
        if any(axis not in by for axis in ref.axes):  # --by left the baseline's axis out: nothing to compare
            return None
    else:
        return None
    return compare.compare_to(summary, by, main.key, ref)


def _plan(args: argparse.Namespace, sweep, df, summary, by, comparisons):
    """`--resolve`: seeds per cell, and the GPU-hours of one more run of each cell: the sweep's cost
    estimate for that cell's config (launcher/cost/sweep_cost.py, which prefers the speed measured by
    runs of the same shape in MLflow); without the sweep file, the GPU-hours its runs logged."""
    import numpy as np

    from reports import compare, tables

    if args.resolve <= 0:
        raise compare.CompareError(f"--resolve {args.resolve:g}: a difference to resolve is > 0 points")
    if comparisons is None:
        raise compare.CompareError(
            "--resolve needs comparisons: name a reference cell with --vs AXIS=VALUE (or baseline: in the "
            "sweep file)"
        )
    estimated = _estimated_run_cost(sweep, summary, by) if sweep is not None else {}

    def run_cost(row: int) -> tuple[float | None, str]:
        if row in estimated:
            return estimated[row]
        if summary.at[row, "kind"] == "random init":
            return 0.0, "a random-init evaluation per seed (not estimated)"
        mask = (tables.healthy(df) & df["gpu_hours"].notna()).to_numpy().copy()
        for axis in by:
            mask &= np.array([compare.same(v, summary.at[row, axis]) for v in df[axis]])
        hours = df.loc[mask, "gpu_hours"]
        if hours.empty:
            return None, "no estimate"
        return float(hours.mean()), "measured: GPU-hours logged by its runs (pretraining)"

    return compare.plan_seeds(summary, comparisons, args.resolve, run_cost, args.seed_sd)


def _estimated_run_cost(sweep, summary, by) -> dict[int, tuple[float | None, str]]:
    """{summary row: (GPU-hours of one run of that cell, source)} from the sweep's cost estimate of one
    run per cell (pretraining and the sweep's evaluations); {} when it cannot be estimated."""
    from launcher.cost import estimate
    from launcher.grid import expand
    from reports.compare import same

    try:
        runs = expand(sweep)
        chosen = {}
        for i, row in summary.iterrows():
            if row["kind"] != "cell":
                continue
            match = (r for r in runs if all(a not in r.axes or same(r.axes[a], row[a]) for a in by))
            spec = next(match, None)
            if spec is not None:
                chosen[int(i)] = spec
        cost = estimate(sweep, list(chosen.values()))
    except Exception as err:  # noqa: BLE001 - the plan falls back to the measured GPU-hours
        print(f"note: no cost estimate ({type(err).__name__}: {err})", file=sys.stderr)
        return {}
    return {
        i: (r.gpu_hours, f"estimate ({r.source}, launcher/cost)")
        for i, r in zip(chosen, cost.runs, strict=True)
    }


def _with_weights(args: argparse.Namespace, summary, by, columns):
    """The summary with a row per `--with` weights file (the plots and pivot keep the runs only)."""
    paths = [p for value in args.with_weights for p in value.split(",") if p]
    if not paths:
        return summary
    import pandas as pd

    from dino.config.schema import to_dict
    from launcher.errors import UserError
    from launcher.grid import expand
    from launcher.sweep_file import load_sweep
    from reports.weights_rows import WeightsRowError, weights_rows

    if not args.sweep_file:
        raise UserError("--with needs the sweep file (its evaluation data selects the results)")
    data = to_dict(expand(load_sweep(args.sweep_file, args.overrides))[0].config.data)
    try:
        rows = weights_rows(paths, by, columns, data)
    except WeightsRowError as err:
        raise UserError(str(err)) from None
    return pd.concat([summary, rows], ignore_index=True)


def write_html(path, uri, experiment, df, summary, by, columns, with_paper, shown=None, comparisons=None,
               notes=(), plan=None, every=None, ranking="") -> None:  # fmt: skip
    """The page: `df` the runs that can be results (plots, curves), `every` all the collected runs (the
    runs table; those a search pruned also get their section); `ranking` the search's rung
    correlations in HTML."""
    import math

    from dino.io.mlflow_store import existing_client
    from reports import plots, search, tables

    client = existing_client(uri)
    main = columns[0]
    table = shown if shown is not None else summary
    ablation = tables.render(table, by, columns, "html", with_paper=with_paper, comparisons=comparisons,
                             notes=notes)  # fmt: skip
    sections = [("Ablation", tables.with_warning(ablation, tables.mixed_code(df), "html") + ranking)]
    if len(by) == 2:
        sections.append((f"{main.header}: {by[0]} × {by[1]}", tables.pivot(summary, by, main, "html")))
    if plan is not None:
        lines = "".join(tables.note_block(line, "html") for line in plan.lines())
        sections.append(
            (f"Seeds to resolve {plan.delta:g} points", lines + tables.export(plan.table, "html"))
        )
    every = every if every is not None else df
    pruned = search.split(every)[1]
    cut = search.pruned_section(pruned, df.attrs["axes"], search.search_of(df), "html", heading=False)
    if cut:
        heading = search.pruned_heading(search.search_of(df) or {})
        sections.append((search.HEADING, f"{tables.note_block(heading, 'html')}\n{cut}"))
    sections.append(("Runs", tables.runs_table(every, by, columns, "html")))
    figures = []
    if summary[f"{main.key}_n"].sum():
        figures.append((f"{main.header} against {by[0]} (mean and 95 % interval; random init dashed)",
                        plots.metric_vs_axis(summary, by, main.key, main.header)))  # fmt: skip
    shown = df.head(40)  # curves of more runs are unreadable; the table has them all
    curves = [("loss", "training loss"), ("teacher_entropy", "teacher entropy")]
    if df[KNN_HEADLINE_COLUMN].notna().any():  # one point per evaluated checkpoint
        curves.insert(0, (EVAL_COLUMNS[KNN_HEADLINE_COLUMN], f"k-NN top-1 (k={HEADLINE_K})"))
    if MONITOR_TOP1 in df and df[MONITOR_TOP1].notna().any():  # monitor.knn_every_*
        curves.insert(0, (MONITOR_TOP1, "k-NN top-1 during pretraining (monitor)"))
    for key, label in curves:
        histories = {
            r.run: [(m.step, m.value) for m in client.get_metric_history(r.mlflow_run_id, key)]
            for r in shown.itertuples()
        }
        log_k = (
            math.log(df["out_dim"].dropna().iloc[0])
            if key == "teacher_entropy" and df["out_dim"].notna().any()
            else None
        )
        figures.append((f"{label} per run", plots.curves(histories, label, hline=log_k)))
    note = f"experiment {experiment} in {uri}; {len(df)} runs; means over healthy runs only."
    if len(pruned):
        note += f" {len(pruned)} run(s) pruned by successive halving: listed apart, never results."
    with open(path, "w") as f:
        f.write(tables.page(f"dinolab report: {experiment}", sections, figures, note))


def _attach(folder: str, path: str) -> None:
    """Keep the report as an artifact of the sweep's parent run (when there is one)."""
    if not folder:
        return
    from dino.io.tracking import read_link

    link = read_link(folder)
    if link is None:
        return
    from dino.io.mlflow_store import existing_client

    try:
        existing_client(link["uri"]).log_artifact(link["run_id"], path, "reports")
    except Exception as err:  # noqa: BLE001 - the report itself is written; say why it is not attached
        print(f"note: report not attached to MLflow run {link['run_id']}: {err}", file=sys.stderr)
