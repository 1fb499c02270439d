"""The `dinolab` command line. `train` composes a config with Hydra overrides and calls `dino.train.run`.

Errors a user can fix (config typos, missing data, checkpoints of another config, NaN loss) are
printed as one clear line with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

EPILOG_TRAIN = """\
overrides are Hydra syntax: group choices (model=vit_small, data=fashion_mnist) and keys
(optim.epochs=10 crops.num_local=6 run.dir=runs/a). Groups: model={vit_test,vit_tiny,vit_small,vit_base},
data={synthetic,fashion_mnist,imagefolder}. Show the resolved config with --cfg.
"""


def _train(args: argparse.Namespace) -> int:
    import yaml

    from dino.config import compose, to_dict

    cfg = compose(args.overrides)
    if args.cfg:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from dino.train import run

    result = run(cfg)
    state = "finished" if result.finished else ("stopped" if result.stopped else "paused at max_steps")
    last = result.last_metrics
    summary = (
        f"loss {last['loss']:.4f}, teacher entropy {last['teacher_entropy']:.3f}" if last else "nothing to do"
    )
    print(f"{state}: step {result.step}/{result.total_steps} in {result.run_dir} ({summary})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolab", description="DINO self-supervised ViT experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="pretrain (or resume) one DINO run",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=vit_test optim.epochs=2")
    train.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dino.checkpoint import CheckpointError
    from dino.config import ConfigError
    from dino.data import DatasetNotFoundError
    from dino.train import ConfigMismatchError, NonFiniteLossError

    try:
        return args.func(args)
    except (
        ConfigError,
        DatasetNotFoundError,
        ConfigMismatchError,
        NonFiniteLossError,
        CheckpointError,
    ) as err:
        print(f"dinolab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
