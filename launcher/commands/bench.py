"""`dinolab bench [overrides...]`: speed of a config's training step (synthetic input and real loader)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
overrides are those of `dinolab train` (model=, crops.*, optim.batch_size, train.precision,
train.compile, train.workers, data=...). Prints img/s per device, ms per step, FLOPs per step,
TFLOP/s and model FLOP utilisation against the card's dense bf16 peak, the loader's standalone rate,
end to end img/s and peak memory. One process, one device.

--save runs/sweeps keeps the result in runs/sweeps/bench.json, keyed by the shape (model, patch,
crops, head, batch, precision, compile) and the card: `dinolab sweep plan` of a sweep with that
root then estimates runs of that shape from it ("calibrated") unless MLflow has measured runs.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the training step on synthetic input and through the real loader",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides as for train, e.g. model=vit_small optim.batch_size=64",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--input", choices=("synthetic", "loader", "both"), default="both")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument(
        "--save",
        metavar="PATH",
        help="keep the result as the calibration of this shape on this card, for `sweep plan`: a JSON "
        "file, or a folder such as a sweep's root (then <folder>/bench.json, where plan looks)",
    )
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from dino.config.compose import compose
    from dino.tools import throughput as bench
    from launcher.errors import UserError

    if args.steps <= 0 or args.warmup < 0:
        raise UserError("--steps must be positive and --warmup >= 0")
    cfg = compose(args.overrides)
    result = bench.run(cfg, args.warmup, args.steps, args.input)
    if args.save:
        from launcher.cost import save_bench

        path = save_bench(args.save, cfg, result)
        print(f"calibration saved to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dinolab bench", show_header=False, title_justify="left")
    for key, value in bench.table_rows(result):
        table.add_row(key, value)
    Console(width=160).print(table)
    return 0
