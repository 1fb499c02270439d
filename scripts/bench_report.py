"""Benchmark (not a test): log N fake-but-realistic runs into a fresh SQLite store through the real
MLflow API, then time `dinolab report` on them.

    .venv/bin/python scripts/bench_report.py --runs 1000 [--folder /tmp/bench-report]

Prints the logging time and the report's wall time (the figure in docs/performance.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="training metric steps per run")
    parser.add_argument("--folder", default="/tmp/bench-report")
    args = parser.parse_args()
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=f"file://{folder / 'artifacts'}")
    parent = client.create_run(exp, run_name="bench", tags={"dinolab.kind": "sweep"}).info.run_id
    params = [Param(f"group{g}.key{k}", str(g * k)) for g in range(6) for k in range(8)]  # ~ a config
    started = time.monotonic()
    for i in range(args.runs):
        num_local, momentum, seed = (0, 2, 6, 10)[i % 4], (0.99, 0.996, 0.999)[(i // 4) % 3], i // 12
        run = client.create_run(exp, run_name=f"nl{num_local}-m{momentum}-s{seed}", tags={
            "mlflow.parentRunId": parent, "dinolab.kind": "run", "axis.crops.num_local": str(num_local),
            "axis.teacher.momentum": str(momentum), "dinolab.seed": str(seed)})  # fmt: skip
        metrics = [Metric(k, v, s, s) for s in range(1, args.steps + 1)
                   for k, v in (("loss", 6 - s / 10), ("teacher_entropy", 4.0), ("kl", 0.5), ("epoch", s / 10),
                                ("avg_img_per_s", 1000.0), ("memory_gib", 9.0), ("gpu_hours", s / 100))]  # fmt: skip
        metrics.append(Metric("knn_top1_k20", 60 + num_local + seed % 3, 0, args.steps))
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[*params, Param("head.out_dim", "65536"), Param("train.seed", str(seed))],
                         tags=[RunTag("dinolab.config_hash", f"{i:08x}")])  # fmt: skip
        client.set_terminated(run.info.run_id, "FINISHED")
    logged = time.monotonic() - started
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "report", "--experiment", "bench", "--tracking-uri", uri],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    took = time.monotonic() - started
    if proc.returncode:
        sys.exit(proc.stderr)
    print(proc.stdout)
    print(
        f"logged {args.runs} runs x {args.steps} steps in {logged:.1f} s; `dinolab report` took {took:.1f} s"
    )


if __name__ == "__main__":
    main()
