"""`dinolab eval {knn,linear} [overrides...]`: evaluate a run's checkpoint (or a baseline)."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
overrides: run.dir=<run> (its newest complete checkpoint's teacher) or checkpoint=<run>/checkpoints/<step>;
or weights=<file> [weights_key=teacher|student] [model=<name> model.patch_size=<n>] data=<preset> for a
file from elsewhere (the reference's .pth, timm .safetensors; results in run.dir, default runs/weights/);
baseline=random|pixels for the same protocol on a randomly initialised backbone or on raw pixels;
data=<preset> and data.<key>=... (default: the run's own data; imagefolder needs data.val_root);
image_size, seed, device, batch_size, shard_size, workers;
knn.k=[10,20,100,200] knn.temperature=0.07 knn.query_chunk knn.bank_chunk knn.max_train knn.max_test;
linear.epochs=100 linear.max_epochs linear.batch_size=256 linear.lr=0.001 (or a list: one head per lr,
chosen on linear.val_fraction=0.1 of the train split) linear.n_last_blocks=4
linear.avgpool=false linear.max_train linear.max_test. Results: <run>/eval/<protocol>/*.json.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="k-NN or linear-probe evaluation of a checkpoint")
    protocols = parser.add_subparsers(dest="protocol", required=True)
    for name, help_text in (
        ("knn", "weighted k-NN on the teacher's CLS features (k = 10, 20, 100, 200)"),
        ("linear", "linear probe on the frozen backbone (resumable, checkpointed every epoch)"),
    ):
        p = protocols.add_parser(
            name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("overrides", nargs="*", help="e.g. run.dir=runs/a knn.max_test=1000")
        p.add_argument("--cfg", action="store_true", help="print the resolved evaluation config and exit")
        p.set_defaults(func=run_command)


def _console():
    from rich.console import Console

    return Console(width=110, soft_wrap=True)


def _provenance(record: dict) -> str:
    if record.get("weights"):
        step = f", step/epoch {record['step']}" if record.get("step") is not None else ""
        what = f"weights {record['weights']} ({record['weights_format']}, {record['weights_key']}{step}, sha256 {record['weights_sha256'][:12]})"
    elif record.get("baseline", "none") != "none":
        what = f"baseline {record['baseline']} (architecture of {record['run_dir']}, config {record['config_hash']})"
    else:
        what = f"checkpoint {record['checkpoint']} (step {record['step']}, config {record['config_hash']})"
    return f"{what}; data {record['data']['name']}, {record['num_train']} train / {record['num_test']} test images"


def run_command(args: argparse.Namespace) -> int:
    if args.cfg:
        import yaml

        from dino.eval.config import _plain
        from dino.eval.features import resolve

        cfg, _ = resolve(args.overrides)
        print(yaml.safe_dump(_plain(cfg), sort_keys=False), end="")
        return 0
    from rich.table import Table

    console = _console()
    from dino.progress import setup_logging

    setup_logging()  # progress and resume messages on stderr
    # Under torchrun every rank evaluates its share; only rank 0 prints.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if args.protocol == "knn":
        from dino.eval.knn import run_knn

        result = run_knn(args.overrides)
        if not is_main:
            return 0
        target_key = result.record["target"]
        table = Table(title=f"k-NN ({target_key})", caption=_provenance(result.record))
        table.add_column("k", justify="right")
        table.add_column("top-1 %", justify="right")
        table.add_column("top-5 %", justify="right")
        for k in sorted(result.top1):
            table.add_row(str(k), f"{result.top1[k]:.2f}", f"{result.top5[k]:.2f}")
        console.print(table)
        console.print(f"written to {result.path}")
        metrics = {
            f"knn_top{n}_k{k}": v for n, acc in ((1, result.top1), (5, result.top5)) for k, v in acc.items()
        }
        _track(result.record, metrics, result.path, "knn", args.overrides)
        return 0
    from dino.eval.linear import run_linear

    result = run_linear(args.overrides)
    if not is_main:
        return 0
    record = result.record
    table = Table(title=f"linear probe ({record['target']})", caption=_provenance(record))
    for col in ("", "epoch", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    final, best = record["final"], record["best_over_epochs"]
    table.add_row(
        "final", f"{final['epoch']}/{result.epochs}", f"{final['top1']:.2f}", f"{final['top5']:.2f}"
    )
    table.add_row("best over epochs", str(best["epoch"]), f"{best['top1']:.2f}", f"{best['top5']:.2f}")
    console.print(table)
    grid = record.get("lr_grid")
    if grid:
        lrs = Table(title=f"learning rates, chosen on the {grid['chosen_on']}")
        for col in ("lr", "held-out top-1 %", "test top-1 %", ""):
            lrs.add_column(col, justify="right")
        for head in grid["heads"]:
            if "top1" in head:
                mark = "chosen" if head["lr"] == grid["chosen_lr"] else ""
                lrs.add_row(f"{head['lr']:g}", f"{head['val_top1']:.2f}", f"{head['top1']:.2f}", mark)
        console.print(lrs)
    state = "finished" if result.finished else f"stopped at epoch {result.epoch} (run again to continue)"
    console.print(f"{state}; written to {result.path}")
    if result.finished:
        metrics = {
            "linear_top1": final["top1"],
            "linear_top5": final["top5"],
            "linear_best_top1": best["top1"],
        }
        if grid:
            metrics["linear_lr"] = grid["chosen_lr"]
            for head in grid["heads"]:
                metrics[f"linear_grid_lr{head['lr']:g}_val_top1"] = head["val_top1"]
                metrics[f"linear_grid_lr{head['lr']:g}_top1"] = head["top1"]
        _track(record, metrics, result.path, "linear", args.overrides)
    return 0


def _track(record: dict, metrics: dict[str, float], path: str, protocol: str, overrides: list[str]) -> None:
    """Log an evaluation into its run's MLflow run (when the run is tracked) at the checkpoint's step;
    baselines under `baseline_<kind>/` so they never pass for the run's own result. A weights file's
    evaluation goes to its own MLflow run (tagged dinolab.kind=weights) when tracking_uri= is given."""
    from dino.tracking import open_run_tracker

    baseline = record.get("baseline", "none")
    prefix = "" if baseline == "none" else f"baseline_{baseline}/"
    tracker = (
        _weights_tracker(record, overrides) if record.get("weights") else open_run_tracker(record["run_dir"])
    )
    tracker.log_metrics({prefix + k: v for k, v in metrics.items()}, int(record.get("step") or 0))
    tracker.log_artifact(path, f"eval/{protocol}")
    tracker.close()


def _weights_tracker(record: dict, overrides: list[str]):
    """The MLflow run of a weights file's evaluations (tied to its results folder by tracking.json)."""
    from dino.eval.config import compose_eval
    from dino.tracking import NullTracker

    cfg = compose_eval(overrides)
    if not cfg.tracking_uri or cfg.tracking_uri == "none":
        return NullTracker()
    from dino.mlflow_tracker import MLflowTracker

    name = os.path.basename(record["run_dir"].rstrip("/"))
    tracker = MLflowTracker(
        cfg.tracking_uri, record["run_dir"], cfg.tracking_experiment, name, training=False
    )
    tracker.set_tags({"dinolab.kind": "weights", "dinolab.weights_sha256": record["weights_sha256"],
                      "dinolab.weights_format": record["weights_format"]})  # fmt: skip
    tracker.log_params({"weights": record["weights"], "weights_key": record["weights_key"],
                        "data.name": record["data"]["name"], "data.root": record["data"].get("root", "")})  # fmt: skip
    tracker.finish()  # only evaluations: nothing runs on
    return tracker
