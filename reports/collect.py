"""MLflow -> one tidy DataFrame: a row per run of a sweep, with its axes, seed, state and metrics.

Reads only the tracking store (a client of dino/io/mlflow_store.py), so a report can be made on a laptop pointed at
the cluster's `mlflow server`; a local store (SQLite, file) that does not exist is an error, never
created. Metric values are the latest logged ones: the final training step, the evaluation of the
newest checkpoint.

A top-1 is a proportion of test images: its interval needs how many. MLflow's metrics do not say, the
evaluation's result JSON does (`num_test`; kept as the run's artifact `eval/<protocol>/*.json`), so
`collect` reads the newest result of each protocol (and of each baseline) of every run that has one
into `n_test:<protocol>:<baseline>` columns, and a linear probe's `lr_grid.chosen_on` (what its lr
was chosen on) into `chosen_on:linear`.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd

from dino.eval.results import EVAL_COLUMNS

# MLflow run status -> the state a report shows.
STATES = {"SCHEDULED": "pending", "RUNNING": "running", "KILLED": "preempted", "FAILED": "failed",
          "FINISHED": "finished"}  # fmt: skip

# Report column -> the metric it reads (latest value).
METRICS = {
    **EVAL_COLUMNS,  # knn_top1@20, linear_top1, linear_best_top1 (dino.eval.results)
    "img_per_s": "avg_img_per_s",
    "memory_gib": "memory_gib",
    "gpu_hours": "gpu_hours",
    "epoch": "epoch",
    "loss": "loss",
    "teacher_entropy": "teacher_entropy",
    "kl": "kl",
}


PRUNED = "pruned"
"""The state of a run a successive-halving search stopped at a rung (tag dinolab.state=pruned)."""
SEARCH_PREFIX = "tags.dinolab.search."
SEARCH_TAG = re.compile(r"tags\.dinolab\.search\.(rung\d+|pruned_at|cell_value|saved_gpu_hours)")


class ReportError(ValueError):
    """Nothing to report: no such store, experiment or runs."""


def search(uri: str, experiment: str) -> pd.DataFrame:
    """The dinolab runs of `experiment`, one row each (the layout of `mlflow.search_runs`), read
    through dino/io/mlflow_store.py."""
    from dino.io import mlflow_store

    if mlflow_store.missing_store(uri):  # opening it would create it: a report creates nothing
        raise ReportError(f"no MLflow store at {uri}: nothing has been tracked there")
    if mlflow_store.existing_client(uri).get_experiment_by_name(experiment) is None:
        raise ReportError(f"no experiment '{experiment}' in {uri} (has the sweep been submitted?)")
    runs = mlflow_store.search_runs(uri, experiment, "tags.`dinolab.kind` = 'run'", max_results=100_000)
    if runs.empty:
        raise ReportError(f"experiment '{experiment}' in {uri} has no dinolab runs yet")
    return runs


def flag(row: pd.Series, out_dim: float) -> str:
    """Collapse or divergence, from the final training metrics (empty when healthy or unknown).

    DINO collapses two ways: to one dimension (teacher entropy -> 0) or to the uniform distribution
    (teacher entropy -> ln K: the targets carry no information, whatever the student does; seen in
    the quickstart's momentum-0.9 runs). A NaN loss is divergence."""
    loss, entropy = row.get("loss"), row.get("teacher_entropy")
    if loss is not None and isinstance(loss, float) and math.isnan(loss):
        return "diverged (NaN loss)"
    if entropy is None or pd.isna(entropy) or not out_dim or pd.isna(out_dim):
        return ""
    log_k = math.log(out_dim)
    if entropy < 0.05 * log_k:
        return "collapsed (one dimension)"
    if entropy > 0.98 * log_k:
        return "collapsed (uniform)"
    return ""


def collect(uri: str, experiment: str) -> pd.DataFrame:
    """One row per run: name, id, axes (`axis.*` tags), seed, state, flag, the METRICS columns, its
    run folder (`run_dir`) and code hash (`code_hash`, NaN when not recorded)."""
    runs = search(uri, experiment)
    axes = sorted(c[len("tags.axis.") :] for c in runs.columns if c.startswith("tags.axis."))
    df = pd.DataFrame(
        {
            "run": runs.get("tags.mlflow.runName"),
            "run_id": runs.get("tags.dinolab.run_id", runs["run_id"]),
            "mlflow_run_id": runs["run_id"],
            "seed": pd.to_numeric(
                runs.get("params.train.seed", runs.get("tags.dinolab.seed")), errors="coerce"
            ),
            "state": runs["status"].map(STATES).fillna(runs["status"].str.lower()),
        }
    )
    for axis in axes:
        df[axis] = runs[f"tags.axis.{axis}"].map(_number)
    for column, metric in METRICS.items():
        key = f"metrics.{metric}"
        df[column] = pd.to_numeric(runs[key], errors="coerce") if key in runs else float("nan")
    for key in runs.columns:  # every other metric too, for --metric (knn_top5_k10 -> knn_top5@10)
        if key.startswith("metrics.") and key[len("metrics.") :] not in METRICS.values():
            df[re.sub(r"^(.*knn_top\d)_k(\d+)$", r"\1@\2", key[len("metrics.") :])] = pd.to_numeric(
                runs[key], errors="coerce"
            )
    # The pretraining GPU-hours its submission estimated (launcher/cost/sweep_cost.py), for the runs table to
    # set beside `gpu_hours`; absent for runs submitted before estimates were kept.
    df["est_gpu_hours"] = pd.to_numeric(_column(runs, "tags.dinolab.estimate_gpu_hours"), errors="coerce")
    df["est_source"] = _column(runs, "tags.dinolab.estimate_source")
    df["out_dim"] = pd.to_numeric(_column(runs, "params.head.out_dim"), errors="coerce")  # K, for ln K
    # The run folder, where its repro.json lies (dino/run/repro.py): tagged at submission
    # (launcher/tracking_runs.py), else the config's run.dir of a lone `dinolab train`.
    tagged, param = _column(runs, "tags.dinolab.run_dir"), _column(runs, "params.run.dir")
    df["run_dir"] = tagged.where(tagged.notna() & (tagged != ""), param)
    # The code the run trained with (set by the training job; runs started before it lack the tag).
    df["code_hash"] = _column(runs, "tags.dinolab.code_hash")
    # A run the collapse guard stopped ends FINISHED with the tag dinolab.state=collapsed (dino/run/train.py).
    stopped = _column(runs, "tags.dinolab.state") == "collapsed"
    df.loc[stopped.to_numpy(), "state"] = "collapsed"
    # A run a successive-halving search pruned (the launcher's decision step tags it dinolab.state=pruned;
    # a revived one is tagged otherwise or not at all): partial training, never a result (reports/search.py).
    pruned = _column(runs, "tags.dinolab.state") == PRUNED
    df.loc[pruned.to_numpy(), "state"] = PRUNED
    # Stopped at a rung (or train.max_steps), not preempted: KILLED in MLflow, tagged paused by the job.
    paused = (_column(runs, "tags.dinolab.state") == "paused") & (df["state"] == "preempted")
    df.loc[paused.to_numpy(), "state"] = "paused"
    df["collapse_step"] = pd.to_numeric(_column(runs, "tags.dinolab.collapse_step"), errors="coerce")
    df["total_steps"] = pd.to_numeric(_column(runs, "tags.dinolab.total_steps"), errors="coerce")
    df["flag"] = [flag(row, k) for (_, row), k in zip(df.iterrows(), df["out_dim"], strict=True)]
    _add_evaluations(uri, df, runs.get("artifact_uri", pd.Series("", index=runs.index)))
    df.attrs["axes"] = axes
    _add_search(runs, df)
    return df.sort_values([*axes, "seed", "run"], ignore_index=True)


def _add_search(runs: pd.DataFrame, df: pd.DataFrame) -> None:
    """A successive-halving search's tags (set by the launcher's decision step on every run that took part
    in a rung's decision): `search:rung<k>` (the run's metric at non-final rung k), and on a pruned run
    `search:pruned_at` (the rung's fraction of the schedule), `search:cell_value` (its cell's mean there),
    `search:saved_gpu_hours`; the search itself in `df.attrs["search"]` ({metric, mode, rungs}). A
    sweep without a search gets none of them."""
    found = [key for key in runs.columns if SEARCH_TAG.fullmatch(key)]
    for key in sorted(found, key=lambda k: (not k.startswith(f"{SEARCH_PREFIX}rung"), len(k), k)):
        df[f"search:{key[len(SEARCH_PREFIX) :]}"] = pd.to_numeric(runs[key], errors="coerce").to_numpy()
    described = {name: _first(runs, SEARCH_PREFIX + name) for name in ("metric", "mode", "rungs")}
    if not found and not any(described.values()):
        return
    rungs = []
    for part in str(described["rungs"] or "").split(","):
        try:
            rungs.append(float(part))
        except ValueError:
            continue
    df.attrs["search"] = {"metric": described["metric"] or "the rung metric",
                          "mode": described["mode"] or "max", "rungs": rungs}  # fmt: skip


def _first(runs: pd.DataFrame, column: str) -> str:
    """The first value a run has in `column` ("" when none has one)."""
    values = _column(runs, column).dropna()
    values = values[values.astype(str) != ""]
    return str(values.iloc[0]) if len(values) else ""


def protocol_of(column: str) -> tuple[str, str] | None:
    """(protocol, baseline) of a report column that is an evaluation's top-k ("knn_top1@20" ->
    ("knn", "none"), "baseline_random/knn_top1@20" -> ("knn", "random")); None for the others."""
    match = re.fullmatch(
        r"(?:baseline_(\w+)/)?(knn_top\d@\d+|linear_(?:best_)?top\d|linear_grid_lr.*_(?:val_)?top1)", column
    )
    if not match:
        return None
    return ("knn" if match[2].startswith("knn") else "linear"), match[1] or "none"


def n_test_column(column: str) -> str | None:
    """The column holding the test images behind `column` (None: it is no top-k)."""
    found = protocol_of(column)
    return f"n_test:{found[0]}:{found[1]}" if found else None


def _add_evaluations(uri: str, df: pd.DataFrame, artifact_uris: pd.Series) -> None:
    """`n_test:<protocol>:<baseline>` and `chosen_on:linear` from each run's newest result JSONs, for
    the runs that logged a result of that protocol."""
    wanted = {}
    for column in df.columns:
        found = protocol_of(column)
        if found:
            wanted.setdefault(found[0], []).append(column)
    found: dict[str, dict[int, object]] = {}
    for protocol, columns in wanted.items():
        has = df[columns].notna().any(axis=1).to_numpy()
        for i in (i for i in range(len(df)) if has[i]):
            newest: dict[str, dict] = {}
            for record in _results(
                uri, str(artifact_uris.iloc[i] or ""), df["mlflow_run_id"].iloc[i], protocol
            ):
                kind = record.get("baseline", "none") or "none"
                if record.get("num_test") and record.get("time", 0) >= newest.get(kind, {}).get("time", 0):
                    newest[kind] = record
            for kind, record in newest.items():
                found.setdefault(f"n_test:{protocol}:{kind}", {})[i] = float(record["num_test"])
                if protocol == "linear" and kind == "none":
                    chosen = (record.get("lr_grid") or {}).get("chosen_on")
                    found.setdefault("chosen_on:linear", {})[i] = chosen or "one lr: nothing chosen"
    for column, values in found.items():
        series = pd.Series([values.get(i) for i in range(len(df))], index=df.index)
        df[column] = series if column.startswith("chosen_on") else pd.to_numeric(series)


def _results(uri: str, artifact_uri: str, run_id: str, protocol: str) -> list[dict]:
    """The result JSONs a run keeps as artifacts under eval/<protocol>/: read where they lie for a
    file or object-store artifact root (dino/io/storage.py), through MLflow for a server's."""
    from dino.io import storage

    records = []
    try:
        if artifact_uri.startswith(("file:", "/", "s3://")):
            folder = storage.join(artifact_uri.removeprefix("file://"), "eval", protocol)
            if storage.isdir(folder):
                for name in storage.listdir(folder):
                    if name.endswith(".json"):
                        records.append(json.loads(storage.read_text(storage.join(folder, name))))
            return records
        import tempfile

        from dino.io import mlflow_store

        client = mlflow_store.existing_client(uri)
        with tempfile.TemporaryDirectory(prefix="dinolab-report-") as tmp:
            for info in client.list_artifacts(run_id, f"eval/{protocol}"):
                if info.path.endswith(".json"):
                    with open(client.download_artifacts(run_id, info.path, tmp)) as f:
                        records.append(json.load(f))
    except Exception as err:  # noqa: BLE001 - a result that cannot be read: its cell says N is unknown
        import logging

        logging.getLogger("dinolab.report").warning("results of %s not read: %s", run_id, err)
    return records


def _column(runs: pd.DataFrame, *names: str) -> pd.Series:
    """The first of `names` that the runs have (NaN when none)."""
    for name in names:
        if name in runs:
            return runs[name]
    return pd.Series(float("nan"), index=runs.index)


def _number(value: str):
    """Axis tags are strings; numbers sort and plot as numbers."""
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
