"""Measured speed, the most trusted: finished, running or preempted runs in the sweep's MLflow store
(any experiment) with the same shape on the same card, and their logged `avg_img_per_s`. One search
per sweep; the store is opened through dino/io/mlflow_store.py and never created."""

from __future__ import annotations

import statistics

from dino.io import mlflow_store
from launcher.cost.model import MEASURED, Speed
from launcher.cost.shapes import SHAPE_KEYS, UNKNOWN_GPU, card_matches


def measured_runs(uri: str) -> tuple[list[tuple[tuple[str, ...], float, float | None, str]], str]:
    """(shape, img/s per GPU, peak memory GiB, experiment) of every finished, running or preempted run
    in the store that logged a throughput and its card, and a note when the store could not be read.
    One search over all experiments; a local store that does not exist is not created."""
    if not uri or mlflow_store.missing_store(uri):
        return [], ""
    try:
        client = mlflow_store.existing_client(uri)
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
        found, token = [], None
        while experiments:
            page = client.search_runs(
                list(experiments), max_results=5000,
                filter_string="tags.`dinolab.kind` = 'run' and metrics.avg_img_per_s > 0",
                page_token=token,
            )  # fmt: skip
            for run in page:
                rate, card = run.data.metrics.get("avg_img_per_s"), run.data.tags.get("dinolab.card", "")
                # A preempted run (KILLED, to be requeued) measured its speed as well as a finished one.
                if run.info.status not in ("FINISHED", "RUNNING", "KILLED") or not rate or not card:
                    continue
                params = run.data.params
                if any(k not in params for k in SHAPE_KEYS):
                    continue
                shape = (*(params[k] for k in SHAPE_KEYS), card)
                found.append(
                    (shape, rate, run.data.metrics.get("memory_gib"), experiments[run.info.experiment_id])
                )
            token = page.token
            if not token:
                break
        return found, ""
    except Exception as err:  # noqa: BLE001 - a plan still works without the store; it says so
        return (
            [],
            f"MLflow store {uri} not read ({str(err).strip().splitlines()[0][:200]}): no measured figures",
        )


def measured_speed(shape: tuple[str, ...], runs: list) -> Speed | None:
    hits = [r for r in runs if r[0][:-1] == shape[:-1] and card_matches(shape[-1], r[0][-1])]
    if not hits:
        return None
    rate = statistics.median(r[1] for r in hits)
    memory = [r[2] for r in hits if r[2] is not None]
    where = sorted({r[3] for r in hits})
    detail = f"median of {len(hits)} run(s) in {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}"
    if shape[-1] == UNKNOWN_GPU:
        detail += f" on {', '.join(sorted({r[0][-1] for r in hits}))}"
    return Speed(rate, max(memory) if memory else None, MEASURED, detail)
