"""`dinolab sweep plan|submit|status|logs|cancel|run <sweep.yaml>`: ablation grids on submitit."""

from __future__ import annotations

import argparse
import os
import sys
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text
from tabulate import tabulate

# Outside a terminal (logs, CI) rich would wrap at 80 columns; tables are wider than that. COLUMNS,
# when set, is the width either way (as rich reads it).
_SIZED = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
console = Console(width=None if _SIZED else 200)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sweep", help="plan, submit, watch and collect ablation grids (sweeps/*.yaml)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_text)
        p.add_argument("sweep_file", help="the sweep file, e.g. sweeps/quickstart.yaml")
        p.add_argument(
            "overrides",
            nargs="*",
            help="edits of the sweep file (root=/tmp/x array_parallelism=2) or extra base overrides",
        )
        p.add_argument(
            "--run", action="append", default=[], help="only this run (name, id or name-id); repeatable"
        )
        p.set_defaults(func=func)
        return p

    p = verb("plan", "dry run: the runs, their ids and states, resources and the sbatch script", _plan)
    p.add_argument("--executor", default="slurm", help="whose script to preview (default slurm)")
    for name, help_text, func in (
        ("submit", "submit new and unfinished runs as job arrays, evaluations chained", _submit),
        ("run", "submit on the local executor, wait with progress, print the results", _run),
    ):
        p = verb(name, help_text, func)
        p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"])
        p.add_argument(
            "--only",
            choices=["new", "unfinished", "failed", "pruned"],
            help="submit only runs in this state (default: all not finished; pruned: revive a search's "
            "pruned runs, trained on to the end)",
        )
        p.add_argument(
            "--max-gpu-hours",
            type=float,
            metavar="N",
            help="refuse, before queuing anything, a submission estimated over N GPU-hours "
            "(default: the sweep file's budget:, if any)",
        )
    p = verb("status", "one table: state, step, loss, GPU-hours, requeues, job, evaluations", _status)
    p.add_argument(
        "--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS until interrupted"
    )
    p.add_argument(
        "--wide",
        action="store_true",
        help="every column: the axes and seed (else only in the run names) and the empty ones",
    )
    p = verb("logs", "tail of the newest job's stdout/stderr of a run", _logs)
    p.add_argument("--stage", default="pretrain", help="pretrain (default), knn or linear")
    p.add_argument("-n", "--lines", type=int, default=40)
    verb("cancel", "cancel the sweep's queued and running jobs", _cancel)


def _load(args: argparse.Namespace, submitted: bool = False):
    """(sweep, its runs as `--run` selects them, all its runs). `submitted`: commands about runs
    already submitted read them from the sweep's manifest instead of expanding the grid again."""
    from launcher import manifest
    from launcher.grid import expand, select
    from launcher.sweep_file import load_sweep

    sweep = load_sweep(args.sweep_file, args.overrides)
    everything = manifest.runs(sweep) if submitted else expand(sweep)
    return sweep, select(everything, args.run), everything


def _plan(args: argparse.Namespace) -> int:
    from launcher import plan
    from launcher.executors import sbatch_preview

    sweep, runs, _ = _load(args)
    show(console, plan.plan_table(sweep, runs))
    console.print(f"{len(runs)} runs in {sweep.folder}; evaluations: {', '.join(sweep.evals) or 'none'}")
    _print_cost(sweep, runs)
    for stage in ("pretrain", *sweep.evals):
        dep = "aftercorr:<pretrain array job id>" if stage != "pretrain" else ""
        script = sbatch_preview(sweep, stage, plan.submitit_folder(sweep), len(runs), dep)
        console.rule(f"sbatch script: {stage} array")
        print(script, flush=True)
    return 0


def _line(text: str) -> None:
    """Plain text: folded at word boundaries to a terminal's (or COLUMNS') width, so that the output
    fits it; in a log (no terminal, no COLUMNS) on one line however long, one fact per line for grep
    (rich would cut it at its arbitrary 200 columns)."""
    console.print(text, markup=False, highlight=False, soft_wrap=not _SIZED)


def _print_cost(sweep, runs) -> None:
    """The cost table and its summary lines (launcher/cost/sweep_cost.py) of the whole sweep."""
    from launcher import cost

    try:
        estimate = cost.estimate(sweep, runs)
    except Exception as err:  # noqa: BLE001 - the rest of the plan stands without a cost
        _line(f"cost: not estimated ({type(err).__name__}: {err})")
        return
    show(console, cost.cost_table(sweep, estimate))
    for line in cost.summary_lines(sweep, estimate):
        _line(line)
    if sweep.search.halving:
        from launcher import halving

        _line(halving.expected_cost(sweep, estimate)[2])


def _estimate_submission(args: argparse.Namespace, sweep, todos) -> dict:
    """The cost of what this submission would queue, checked against --max-gpu-hours (else the
    sweep's budget:) before anything is queued; returns each run's estimate for its record."""
    from launcher import cost, plan, records

    train, eval_only = plan.to_submit(todos, args.only)
    work = {}
    for todo in train:
        record = records.read_record(todo.run.run_dir)
        total, step = record.get("total_steps") or 0, record.get("step") or 0
        work[todo.run.run_id] = (1 - step / total if todo.action != plan.NEW and total else 1.0, todo.evals)
    for todo in eval_only:
        work[todo.run.run_id] = (0.0, todo.evals)
    chosen = [t.run for t in [*train, *eval_only]]
    limit = args.max_gpu_hours if args.max_gpu_hours is not None else sweep.budget
    origin = "--max-gpu-hours" if args.max_gpu_hours is not None else "the sweep's budget"
    try:
        estimate = cost.estimate(sweep, chosen, work)
    except Exception as err:
        if limit:  # a budget that cannot be checked is not a budget: refuse
            raise cost.BudgetExceeded(
                f"{sweep.path}: {origin} is {limit:g} GPU-hours but the cost could not be estimated "
                f"({type(err).__name__}: {err}); nothing was submitted"
            ) from None
        _line(f"note: no cost estimate ({type(err).__name__}: {err})")
        return {}
    if chosen:
        _line(cost.summary_lines(sweep, estimate)[0])
    if sweep.search.halving and limit:  # the budget is the whole search's, not this rung's
        _check_search_budget(sweep, todos, limit, origin)
    elif limit:
        cost.check_budget(sweep, estimate, limit, origin)
    return {r.run.run_id: cost.record_fields(r) for r in estimate.runs}


def _check_search_budget(sweep, todos, limit: float, origin: str) -> None:
    """A halving search's budget: its expected GPU-hours over every run (`halving.expected_cost`)."""
    from launcher import cost, halving

    expected, full, line = halving.expected_cost(sweep, cost.estimate(sweep, [t.run for t in todos]))
    _line(line)
    if expected > limit:
        raise cost.BudgetExceeded(
            f"{sweep.path}: the search is expected to cost {cost.gpu_hours_text(expected)} GPU-hours "
            f"(the full grid {cost.gpu_hours_text(full)}), over {origin} of {limit:g}. Nothing was submitted: "
            "search fewer cells, prune harder (search.keep, an earlier first rung) or raise the limit"
        )


def _check_executor(executor: str) -> None:
    """`--executor slurm` where there is no SLURM: one line, before any record, folder or MLflow run."""
    if executor == "slurm":
        from launcher.executors import require_slurm

        require_slurm()


def _submit(args: argparse.Namespace) -> int:
    from launcher import manifest, plan, submission

    sweep, runs, everything = _load(args)
    _check_executor(args.executor)
    todo = plan.classify(sweep, runs)
    show(console, plan.plan_table(sweep, runs, todo))
    estimates = _estimate_submission(args, sweep, todo)
    submitted = submission.submit(sweep, todo, args.executor, only=args.only, estimates=estimates)
    manifest.write(sweep, everything)  # what status, logs and cancel read back
    console.print(submitted.summary())
    return 0


def _run(args: argparse.Namespace) -> int:
    from launcher import manifest, plan, status, submission

    sweep, runs, everything = _load(args)
    _check_executor(args.executor)
    todo = plan.classify(sweep, runs)
    estimates = _estimate_submission(args, sweep, todo)
    submitted = submission.submit(sweep, todo, args.executor, only=args.only, estimates=estimates)
    manifest.write(sweep, everything)
    console.print(submitted.summary())
    ok = submission.wait(sweep, runs, submitted, console)
    if sweep.search.halving:  # the later rungs: submitted by each rung's decision job
        ok = submission.wait_search(sweep, runs, submitted, console) and ok
    show(console, status.status_table(sweep, runs, compact=True))
    return 0 if ok else 1


def _status(args: argparse.Namespace) -> int:
    from launcher import status

    sweep, runs, _ = _load(args, submitted=True)
    if not args.watch:
        show(console, status.status_table(sweep, runs, compact=not args.wide))
        return 0
    from rich.live import Live
    from rich.text import Text

    def view():
        table = status.status_table(sweep, runs, compact=not args.wide)
        return Text(plain(table)) if table.row_count > LONG else table

    with Live(view(), console=console, refresh_per_second=1) as live:
        while True:
            time.sleep(args.watch)
            live.update(view())


def _logs(args: argparse.Namespace) -> int:
    from launcher import status
    from launcher.errors import UserError

    sweep, runs, _ = _load(args, submitted=True)
    if len(runs) != 1:
        raise UserError(
            f"name one run with --run (the sweep has {len(runs)}: {', '.join(r.name for r in runs)})"
        )
    console.print(status.log_tail(runs[0], args.stage, args.lines), markup=False, highlight=False)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from launcher import submission

    sweep, runs, _ = _load(args, submitted=True)
    deciders = submission.cancel_deciders(sweep) if sweep.search.halving and not args.run else []
    for line in [*deciders, *submission.cancel(runs)]:
        console.print(line)
    return 0


# ---- long tables ---------------------------------------------------------------------------------------
# A table of runs: rich's framed, coloured table, or plain columns when it is long.
#
# rich lays a table out by measuring every cell: about 3 s for the 1,000 rows of a large search on
# our 2-core machine, longer than reading the 1,000 runs' files. Past `LONG` rows `sweep plan` and
# `sweep status` print the same columns in tabulate's "simple" layout (0.02 s for 10,000 rows), one
# line per run (what a long listing is for: grep, less), with the table's title above and its caption
# below.

LONG = 200


def plain(table: Table) -> str:
    """The table's title, rows and caption as aligned plain text."""
    columns = [[c.plain if isinstance(c, Text) else str(c) for c in column.cells] for column in table.columns]
    headers = [str(c.header) for c in table.columns]
    text = "".join(headers) + "".join("".join(column) for column in columns)
    if table.row_count and text.isascii() and text.isprintable():
        # One-line ASCII cells (every run table), laid out here as tabulate's "simple" format lays them
        # out (cells stripped, a column as wide as its widest cell or its header + 2, two spaces
        # between, lines right-stripped): tabulate first guesses each cell's type, 0.5 s of a
        # 10,000-run plan. Anything else (wide characters, line breaks, escapes) goes to tabulate.
        columns = [[cell.strip() for cell in column] for column in columns]
        widths = [max(len(h) + 2, *map(len, column)) for h, column in zip(headers, columns, strict=True)]
        lines = ["  ".join(map(str.ljust, headers, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(map(str.ljust, row, widths)) for row in zip(*columns, strict=True)]
        body = "\n".join(line.rstrip() for line in lines)
    else:
        body = tabulate(
            list(zip(*columns, strict=True)), headers=headers, tablefmt="simple", disable_numparse=True
        )
    return "\n".join(str(part) for part in (table.title, body, table.caption) if part)


def show(console: Console, table: Table) -> None:
    if table.row_count > LONG:
        console.print(plain(table), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(table)
