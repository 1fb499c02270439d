"""Successive halving over a sweep's grid (`search: {strategy: halving}` in the sweep file).

Every run trains to the first rung (`train.stop_at`, a fraction of its own schedule: the schedules
still span the whole run, so a run paused there and continued is the run it would have been), writes
a complete checkpoint there and logs the search metric (the k-NN monitor runs at the last step of
every rung job: `monitor.knn_at_end`). When every run of the rung has stopped, one decision: the
cells (a grid point with all its seeds, decided together on the mean of their values) are ranked,
the best ceil(cells / keep) go on to the next rung, the rest end `pruned` with the rung, their value
and the GPU-hours not spent. The promoted runs resume from their rung checkpoint; at the last rung
(1.0) they train to the end and are evaluated like any run.

The rule is synchronous (each rung decided once, over all its runs), not asynchronous (ASHA:
promote a run as soon as it is in the top 1/keep of those that reached the rung so far). Why: the
decision does not depend on which jobs the queue happened to start first, so resubmitting or
rerunning a search prunes the same cells; exactly ceil(cells / keep) cells go on, so the plan's
GPU-hour estimate is what the search spends; and on SLURM a rung is one job array whose end starts
the decision (`afterany`). Its cost: a slow run holds its rung's decision.

What was decided lives in `<sweep folder>/search.json` (written only here): per rung, each cell's
value and runs, which went on and which were pruned, and the decision job of the rung; a resubmit
reads it and never repeats a decision or retrains a pruned run (`--only pruned` revives them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from dino.io import storage
from launcher import records
from launcher.errors import UserError
from launcher.grid import RunSpec
from launcher.sweep_file import Search, Sweep

SEARCH_FILE = "search.json"


def fraction_key(fraction: float) -> str:
    """How a rung is named in records and search.json: '0.2', '1.0'."""
    return f"{fraction:g}" if fraction != 1 else "1.0"


def cell_of(run: RunSpec) -> str:
    """The grid point of a run, its seeds together: the axes as one JSON key."""
    return json.dumps(run.axes, sort_keys=True, default=str)


def cell_name(runs: list[RunSpec]) -> str:
    """A cell's name: its runs' name without the seed suffix (names spell the axes)."""
    name, suffix = runs[0].name, f"-s{runs[0].seed}"
    return name[: -len(suffix)] if name.endswith(suffix) else name


# ---- what was decided --------------------------------------------------------------------------------


def state_path(sweep: Sweep) -> str:
    return storage.join(sweep.folder, SEARCH_FILE)


def read_state(sweep: Sweep) -> dict[str, Any]:
    """search.json: {"rungs": {index: decision}, "deciders": {index: job}}; empty before any."""
    path = state_path(sweep)
    if not storage.exists(path):
        return {"rungs": {}, "deciders": {}}
    try:
        state = json.loads(storage.read_text(path))
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
    except ValueError as err:  # JSONDecodeError too
        # Not read as empty: what it says (decisions, revived runs, decision jobs) must not be lost silently.
        raise UserError(
            f"{path} is damaged ({err}): it holds the search's decisions; restore it, or remove it to have "
            "each rung decided again from the runs' records"
        ) from None
    state.setdefault("rungs", {})
    state.setdefault("deciders", {})
    return state


def write_state(sweep: Sweep, state: dict[str, Any]) -> None:
    storage.makedirs(sweep.folder)
    storage.atomic_write_text(state_path(sweep), json.dumps(state, indent=1))


def target_rung(run_id: str, state: dict[str, Any], rungs: list[float]) -> int | None:
    """The rung a run trains to next: the first one not decided for it (None: pruned; a pruned run
    revived with `--only pruned`: the last)."""
    if run_id in state.get("revived", []):
        return len(rungs) - 1
    for k in range(len(rungs) - 1):
        decision = state["rungs"].get(str(k))
        if decision is None:
            return k
        if run_id in decision["pruned"]:
            return None
        if run_id not in decision["promoted"]:
            return k  # not a candidate of that decision (added to the grid later): it gets there first
    return len(rungs) - 1


def rung_value(record: dict[str, Any], fraction: float, metric: str) -> float | None:
    """The run's value of the search metric at a rung, as its job recorded it (None: not reached)."""
    value = (record.get("rungs") or {}).get(fraction_key(fraction), {}).get("metrics", {}).get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass
class Cell:
    key: str
    name: str
    runs: list[RunSpec]
    values: dict[str, float | None] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        """The mean over the seeds that reached the rung (None: none did)."""
        got = [v for v in self.values.values() if v is not None]
        return sum(got) / len(got) if got else None


def decide(sweep: Sweep, runs: list[RunSpec], k: int) -> dict[str, Any]:
    """Decide rung k (once: a decided rung is returned as it was): rank its cells on the mean of
    their runs' values, keep the best ceil(cells / keep), prune the others (their records, and their
    MLflow runs' tags). Runs without a value (failed or lost before the rung) count as worst."""
    search = sweep.search
    state = read_state(sweep)
    if str(k) in state["rungs"]:
        return state["rungs"][str(k)]
    fraction = search.rungs[k]
    candidates = [r for r in runs if target_rung(r.run_id, state, search.rungs) == k]
    cells: dict[str, Cell] = {}
    for run in candidates:
        cell = cells.setdefault(cell_of(run), Cell(cell_of(run), "", []))
        cell.runs.append(run)
        cell.values[run.run_id] = rung_value(records.read_record(run.run_dir), fraction, search.metric)
    for cell in cells.values():
        cell.name = cell_name(cell.runs)
    sign = -1.0 if search.mode == "max" else 1.0
    ranked = sorted(cells.values(), key=lambda c: (c.value is None, sign * (c.value or 0.0), c.name))
    n_keep = math.ceil(len(ranked) / search.keep)
    kept = {c.key for c in ranked[:n_keep] if c.value is not None}
    decision = {
        "fraction": fraction,
        "metric": search.metric,
        "mode": search.mode,
        "keep": search.keep,
        "decided": time.time(),
        "cells": [
            {
                "name": c.name,
                "value": c.value,
                "kept": c.key in kept,
                "runs": {r.run_id: c.values[r.run_id] for r in c.runs},
            }
            for c in ranked
        ],  # fmt: skip
        "promoted": [r.run_id for c in ranked if c.key in kept for r in c.runs],
        "pruned": [r.run_id for c in ranked if c.key not in kept for r in c.runs],
    }
    saved = _prune(sweep, [c for c in ranked if c.key not in kept], k)
    _tag(sweep, candidates, decision, k, saved)
    state["rungs"][str(k)] = decision
    write_state(sweep, state)
    return decision


def _prune(sweep: Sweep, cells: list[Cell], k: int) -> dict[str, float]:
    """Each run of `cells` recorded `pruned`; returns {run id: the GPU-hours its pruning saved}."""
    fraction = sweep.search.rungs[k]
    saved = {}
    for cell in cells:
        for run in cell.runs:
            spent = float(records.read_record(run.run_dir).get("gpu_hours") or 0.0)
            saved[run.run_id] = spent * (1 - fraction) / fraction
            records.update_record(
                run.run_dir, state=records.PRUNED, pruned_at=fraction, rung_value=cell.values[run.run_id],
                cell_value=cell.value, search_metric=sweep.search.metric, saved_gpu_hours=saved[run.run_id],
            )  # fmt: skip
    return saved


def _tag(
    sweep: Sweep, candidates: list[RunSpec], decision: dict[str, Any], k: int, saved: dict[str, float]
) -> None:
    """The decision on each candidate's MLflow run (the report reads these tags): its value at the
    rung, and for a pruned run the rung, its cell's value and the GPU-hours saved (`saved`)."""
    from launcher import tracking_runs

    search = sweep.search
    values = {run_id: v for cell in decision["cells"] for run_id, v in cell["runs"].items()}
    cell_values = {run_id: cell["value"] for cell in decision["cells"] for run_id in cell["runs"]}
    common = {"dinolab.search.metric": search.metric, "dinolab.search.mode": search.mode,
              "dinolab.search.rungs": ",".join(fraction_key(f) for f in search.rungs)}  # fmt: skip
    tags: dict[str, dict[str, str]] = {}
    for run in candidates:
        own = {
            **common,
            f"dinolab.search.rung{k}": "" if values[run.run_id] is None else f"{values[run.run_id]:.6g}",
        }
        if run.run_id in decision["pruned"]:
            own.update({"dinolab.state": records.PRUNED, "dinolab.search.pruned_at": fraction_key(decision["fraction"]),
                        "dinolab.search.cell_value": "" if cell_values[run.run_id] is None else f"{cell_values[run.run_id]:.6g}",
                        "dinolab.search.saved_gpu_hours": f"{saved[run.run_id]:.6g}"})  # fmt: skip
        tags[run.run_id] = own
    tracking_runs.prepare(sweep, candidates, tags=tags)


def revive(sweep: Sweep, runs: list[RunSpec]) -> None:
    """`--only pruned`: these pruned runs train on to the end (they stay listed in the decision that
    pruned them; their MLflow runs lose the `pruned` state)."""
    from launcher import tracking_runs

    state = read_state(sweep)
    state["revived"] = sorted({*state.get("revived", []), *(r.run_id for r in runs)})
    write_state(sweep, state)
    tracking_runs.prepare(sweep, runs, tags={r.run_id: {"dinolab.state": "revived"} for r in runs})


# ---- the cost ----------------------------------------------------------------------------------------


def runs_per_rung(sweep: Sweep, cells: int) -> list[int]:
    """How many cells train in each rung: all, then ceil(n / keep) of the previous, ..."""
    counts = [cells]
    for _ in sweep.search.rungs[1:]:
        counts.append(math.ceil(counts[-1] / sweep.search.keep))
    return counts


def halving_fraction(sweep: Sweep, cells: int) -> float:
    """The search's pretraining cost as a fraction of the full grid's (same cells, same seeds)."""
    if not cells:
        return 1.0
    counts, rungs = runs_per_rung(sweep, cells), sweep.search.rungs
    spent = sum(n * (f - prev) for n, f, prev in zip(counts, rungs, [0.0, *rungs[:-1]], strict=True))
    return spent / cells


def count_cells(runs: list[RunSpec]) -> int:
    return len({cell_of(r) for r in runs})


def describe(search: Search) -> str:
    rungs = ", ".join(f"{f:.0%}" for f in search.rungs)
    return f"successive halving on {search.metric} ({search.mode}), rungs {rungs}, keep 1/{search.keep}"


def expected_cost(sweep: Sweep, full: Any) -> tuple[float, float, str]:
    """(the search's expected GPU-hours, the full grid's, one line saying so) from the full grid's
    estimate (`launcher.cost.estimate` of every run): pretraining's images scaled by
    `halving_fraction`, what each pretraining job pays once (measured: warm-up and the k-NN monitor,
    `Speed.fixed_s`) by the rung jobs the search starts against one job a run, the evaluations by the
    share of cells that reach the end."""
    runs = [r.run for r in full.runs]
    cells = count_cells(runs)
    counts = runs_per_rung(sweep, cells)
    stages = full.by_stage()
    fixed = full.fixed("pretrain")
    streamed = stages.get("pretrain", 0.0) - fixed
    evals = sum(v for k, v in stages.items() if k != "pretrain")
    share = 1 / max(cells, 1)
    pretrain = streamed * halving_fraction(sweep, cells) + fixed * sum(counts) * share
    search = pretrain + evals * counts[-1] * share
    from launcher.cost import gpu_hours_text

    saved = 1 - search / full.gpu_hours if full.gpu_hours else 0.0
    line = (
        f"search: {describe(sweep.search)}: {' → '.join(map(str, counts))} cells; expected "
        f"{gpu_hours_text(search)} GPU-hours (pretrain {gpu_hours_text(pretrain)}) against "
        f"{gpu_hours_text(full.gpu_hours)} for the full grid ({saved:.0%} less)"
    )
    return search, full.gpu_hours, line
