"""Rows for evaluations of outside weights (`dinolab report --with PATH`): the released ViT-S/16 beside
a sweep's runs.

A weights file's evaluations are result JSONs under its results folder (`dinolab eval ... weights=F`
writes to `runs/weights/<stem>-<sha256[:12]>` unless given run.dir=). Only results on the sweep's own
evaluation data (same dataset and root) are used, the newest per protocol; the row's state column
says which file and how many test images, so a row on a subset is never mistaken for one on the
whole split.
"""

from __future__ import annotations

import math
import posixpath

import pandas as pd

from dino.eval.results import HEADLINE_K, KNN_HEADLINE_COLUMN, LINEAR_TOP1, read_results
from dino.io import storage
from reports.tables import Column, cell_fields


class WeightsRowError(ValueError):
    """A --with path that has no usable evaluation; the message says what was looked for."""


def results_folder(path: str) -> str:
    """The eval results folder of `path`: itself when it holds eval/, else the default folder of the
    weights file (read to hash it)."""
    if storage.isdir(storage.join(path, "eval")):
        return path
    from dino.io import weights

    return storage.join("runs", "weights", weights.read(path).identity)


def _records(folder: str, protocol: str) -> list[dict]:
    """A weights file's results of `protocol` (not a run's), oldest first."""
    return [record for _, record in read_results(folder, protocol) if record.get("weights")]


def _same_data(record: dict, data: dict) -> bool:
    return record["data"].get("name") == data.get("name") and record["data"].get("root") == data.get("root")


def weights_rows(paths: list[str], by: list[str], columns: list[Column], data: dict) -> pd.DataFrame:
    """Summary-shaped rows (see `reports.tables.summarize`), one per weights file: one evaluation, so
    each cell is a single value with its binomial interval ("1 seed")."""
    rows = []
    for path in paths:
        folder = results_folder(path)
        knn = [r for r in _records(folder, "knn") if _same_data(r, data)]
        linear = [r for r in _records(folder, "linear") if _same_data(r, data) and r.get("finished")]
        if not knn and not linear:
            raise WeightsRowError(
                f"--with {path}: no k-NN or finished linear result on data {data.get('name')} "
                f"(root {data.get('root') or '-'}) under {storage.join(folder, 'eval')}; evaluate it first: "
                f"dinolab eval knn weights={path} data={data.get('name')}"
            )
        source = (knn or linear)[-1]["weights"]  # the file itself, also when PATH is a results folder
        stem = posixpath.basename(source.rstrip("/")).split(".")[0]
        values = {KNN_HEADLINE_COLUMN: knn[-1]["top1"].get(str(HEADLINE_K)) if knn else None,
                  LINEAR_TOP1: linear[-1]["final"]["top1"] if linear else None}  # fmt: skip
        row: dict = {axis: (f"weights: {stem}" if i == 0 else "—") for i, axis in enumerate(by)}
        records = {KNN_HEADLINE_COLUMN: knn[-1] if knn else None, LINEAR_TOP1: linear[-1] if linear else None}
        for col in columns:
            value, record = values.get(col.key), records.get(col.key)
            one = {} if value is None or math.isnan(float(value)) else {("weights", source): float(value)}
            row.update(cell_fields(col.key, one, record["num_test"] if record else None))
        sizes = [f"{p} on {r['num_test']} test images" for p, r in (("k-NN", knn[-1] if knn else None),
                 ("linear", linear[-1] if linear else None)) if r]  # fmt: skip
        row.update(runs=1, left_out=0, label=f"weights: {stem}", kind="weights")
        row["state"] = f"weights {source} ({'; '.join(sizes)})"
        rows.append(row)
    return pd.DataFrame(rows)
