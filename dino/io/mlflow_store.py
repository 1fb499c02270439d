"""The MLflow store: clients, the SQLite write lock, experiments and runs.

Every MLflow client of dinolab comes from here: `client` for the training tracker and the sweep
launcher (which creates the experiment and every run before a job starts), `existing_client` for
those that only read (reports, cost estimates) or attach an artifact: they check `missing_store`
first, since MLflow creates a missing SQLite or file store (and its folders) as soon as it opens it.
MLflow is imported lazily: it costs about a second.

SQLite stores are shared by all the processes of a machine (a local sweep runs several jobs at
once), and SQLite plus MLflow's schema migration are not safe to race: the first two processes to
open a fresh database both try to create its tables ("table already exists"). Every call that may
write to an SQLite store therefore holds an exclusive `flock` on `<db>.lock`. For many machines, use
an `mlflow server`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

# dinolab retries failed tracking calls itself, in the background; MLflow's own HTTP retries (7, with
# exponential backoff: minutes) would only hold a batch back long after the server is up again.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

# Errors that retrying cannot fix (MLflow error codes); anything else counts as an outage.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}


def sqlite_path(uri: str) -> str | None:
    """The database file of a `sqlite:///relative` or `sqlite:////absolute` URI (None otherwise)."""
    return os.path.abspath(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def local_store_path(uri: str) -> str | None:
    """The database file (`sqlite:///`) or folder (`file:`) of a store on this machine; None for a
    server."""
    if path := sqlite_path(uri):
        return path
    if uri.startswith("file:"):
        return os.path.abspath(urlsplit(uri).path)
    return None


def missing_store(uri: str) -> str | None:
    """The path of a local store that does not exist (None when it does, or for a server). Readers
    check it first: MLflow creates a store (and its folders) on first use, even to read."""
    path = local_store_path(uri)
    return path if path is not None and not os.path.exists(path) else None


def sqlite_uri(folder: str) -> str:
    """The default store of a sweep root: `sqlite:///<absolute root>/mlflow.db`."""
    return "sqlite:///" + os.path.join(os.path.abspath(folder), "mlflow.db")


@contextlib.contextmanager
def locked(uri: str) -> Iterator[None]:
    """Exclusive access to an SQLite store across processes; nothing for other stores."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client(uri: str) -> Any:
    """An `MlflowClient` on `uri`; for SQLite the schema is created (once, under the lock)."""
    from mlflow.tracking import MlflowClient

    with locked(uri):
        c = MlflowClient(tracking_uri=uri)
        if sqlite_path(uri):
            c.search_experiments(max_results=1)  # opens the store: creates or migrates the schema
    return c


def existing_client(uri: str) -> Any:
    """An `MlflowClient` on a store that must already exist, for reads and artifact uploads (which
    write no row): no lock, no schema, and never a new store (MLflow would create a missing local one
    on first use, even to read). Callers check `missing_store` first to say what they do instead;
    a store missing here is FileNotFoundError."""
    if path := missing_store(uri):
        raise FileNotFoundError(f"no MLflow store at {path}")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def search_runs(uri: str, experiment: str, filter_string: str, max_results: int) -> Any:
    """`mlflow.search_runs` (its DataFrame and paging) on an existing store: that function reads only
    MLflow's global tracking URI, so it is set for the call and put back after it."""
    if path := missing_store(uri):
        raise FileNotFoundError(f"no MLflow store at {path}")
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(
            experiment_names=[experiment], filter_string=filter_string, max_results=max_results
        )
    finally:
        mlflow.set_tracking_uri(previous)


def is_permanent(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in PERMANENT_ERRORS


def ensure_experiment(c: Any, uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing. Artifacts go to `artifact_location` (e.g. an
    s3:// prefix) or, for SQLite stores, beside the database (`<dir>/mlartifacts/`), not in the
    current directory; a server decides for itself."""
    with locked(uri):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = artifact_location
        if location is None and sqlite_path(uri):
            location = "file://" + os.path.join(os.path.dirname(sqlite_path(uri)), "mlartifacts", name)
        try:
            return c.create_experiment(name, artifact_location=location)
        except Exception as err:
            # A server has no file lock: another process may have created it in between.
            if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            return c.get_experiment_by_name(name).experiment_id


def create_run(
    c: Any, uri: str, experiment_id: str, name: str, tags: dict[str, str], status: str = "RUNNING"
) -> str:
    """A new run (SCHEDULED when the launcher creates it for a job that has not started)."""
    with locked(uri):
        run = c.create_run(experiment_id, run_name=name, tags=tags)
        if status != "RUNNING":
            c.update_run(run.info.run_id, status=status)
    return run.info.run_id
