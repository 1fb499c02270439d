"""`dinolab report [sweep.yaml] [--experiment E --tracking-uri U]`: the ablation table of a sweep,
from MLflow alone (Markdown, LaTeX, HTML or CSV), optionally with the paper's numbers and an HTML
page with plots."""

from __future__ import annotations

import argparse
import os
import sys

from dino.eval.results import EVAL_COLUMNS, HEADLINE_K, KNN_HEADLINE_COLUMN, MONITOR_TOP1

EPILOG = """\
The table has one row per ablation value (mean ± std over finished seeds, n), the state of the runs
(pending/running/preempted/failed/finished, collapsed: stopped early by the collapse guard, and
collapse or divergence flags), the best value in bold; runs stopped early are listed with their step
and the GPU-hours saved.
Metrics: knn_top1@20 (default), knn_top1@10/100/200, knn_top5@k, linear_top1, linear_best_top1 (best
over epochs, as the paper reports), img_per_s, memory_gib, gpu_hours, epoch, loss, teacher_entropy.

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


def _source(args: argparse.Namespace) -> tuple[str, str, list[str], str]:
    """(tracking URI, experiment, default axes, sweep folder or "")."""
    from dino.io.mlflow_store import missing_store
    from launcher.errors import UserError

    if args.sweep_file:
        from launcher.sweep import load_sweep

        sweep = load_sweep(args.sweep_file, args.overrides)
        uri = args.tracking_uri or sweep.tracking_uri
        if not uri:
            raise UserError(f"sweep {args.sweep_file} has tracking_uri none: nothing was tracked")
        if missing_store(uri):  # a report creates nothing (MLflow would create the store and its folder)
            submit = " ".join(["dinolab sweep submit", args.sweep_file, *args.overrides])
            raise UserError(f"no MLflow store at {uri}: the sweep has not run (submit it first: {submit})")
        return uri, args.experiment or sweep.name, [*sweep.grid, *sweep.zip], sweep.folder
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not (uri and args.experiment):
        raise UserError("name a sweep file, or --experiment with --tracking-uri (or $MLFLOW_TRACKING_URI)")
    return uri, args.experiment, [], ""


def run_command(args: argparse.Namespace) -> int:
    from launcher.errors import UserError
    from reports import tables
    from reports.collect import ReportError, collect

    uri, experiment, axes, folder = _source(args)
    try:
        df = collect(uri, experiment)
    except ReportError as err:
        raise UserError(str(err)) from None
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
    summary = tables.summarize(df, by, columns)
    shown = _with_weights(args, summary, by, columns)
    text = tables.render(shown, by, columns, args.format, with_paper=args.paper)
    if len(by) == 2 and args.format != "csv":
        text += "\n\n" + tables.pivot(summary, by, columns[0], args.format)
    if args.runs:
        text += "\n\n" + tables.runs_table(df, by, columns, args.format)
    stopped = tables.collapsed_table(df, args.format)
    if stopped:  # saved = spent x (planned - stopped) / stopped steps
        text += (
            "\n\nStopped early by the collapse guard (saved = spent x unrun steps / run steps):\n\n" + stopped
        )
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"table written to {args.output}", file=sys.stderr)
    else:
        print(text)
    if args.html:
        write_html(args.html, uri, experiment, df, summary, by, columns, args.paper, shown)
        print(f"HTML report written to {args.html}", file=sys.stderr)
    for path in filter(None, (args.output, args.html)):
        _attach(folder, path)
    return 0


def _with_weights(args: argparse.Namespace, summary, by, columns):
    """The summary with a row per `--with` weights file (the plots and pivot keep the runs only)."""
    paths = [p for value in args.with_weights for p in value.split(",") if p]
    if not paths:
        return summary
    import pandas as pd

    from dino.config.schema import to_dict
    from launcher.errors import UserError
    from launcher.grid import expand
    from launcher.sweep import load_sweep
    from reports.weights_rows import WeightsRowError, weights_rows

    if not args.sweep_file:
        raise UserError("--with needs the sweep file (its evaluation data selects the results)")
    data = to_dict(expand(load_sweep(args.sweep_file, args.overrides))[0].config.data)
    try:
        rows = weights_rows(paths, by, columns, data)
    except WeightsRowError as err:
        raise UserError(str(err)) from None
    return pd.concat([summary, rows], ignore_index=True)


def write_html(path, uri, experiment, df, summary, by, columns, with_paper, shown=None) -> None:
    import math

    from dino.io.mlflow_store import existing_client
    from reports import plots, tables
    from reports.html import page

    client = existing_client(uri)
    main = columns[0]
    table = shown if shown is not None else summary
    sections = [("Ablation", tables.render(table, by, columns, "html", with_paper=with_paper))]
    if len(by) == 2:
        sections.append((f"{main.header}: {by[0]} × {by[1]}", tables.pivot(summary, by, main, "html")))
    sections.append(("Runs", tables.runs_table(df, by, columns, "html")))
    figures = []
    if summary[f"{main.key}_n"].sum():
        figures.append((f"{main.header} against {by[0]} (mean ± std over seeds)",
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
    note = f"experiment {experiment} in {uri}; {len(df)} runs; means over finished runs only."
    with open(path, "w") as f:
        f.write(page(f"dinolab report: {experiment}", sections, figures, note))


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
