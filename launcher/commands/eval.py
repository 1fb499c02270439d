"""`dinolab eval {knn,linear} [overrides...]`: evaluate a run's checkpoint (or a baseline)."""

from __future__ import annotations

import argparse
import os

from dino.eval.results import KNN, PROTOCOLS

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
    for name, help_text in zip(
        PROTOCOLS,
        (
            "weighted k-NN on the teacher's CLS features (k = 10, 20, 100, 200)",
            "linear probe on the frozen backbone (resumable, checkpointed every epoch)",
        ),
        strict=True,
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

        from dino.config.schema import to_dict
        from dino.eval.evaluated import resolve

        cfg, _ = resolve(args.overrides)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from rich.table import Table

    console = _console()
    from dino.run.progress import setup_logging

    setup_logging()  # progress and resume messages on stderr
    # Under torchrun every rank evaluates its share; only rank 0 prints.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if args.protocol == KNN:
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
    return 0
