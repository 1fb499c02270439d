"""The `dinolab` command line: one module per subcommand under `launcher/commands/`.

Errors a user can fix (config typos, missing data, checkpoints of another config, NaN loss) are
printed as one clear line with exit code 2, without a traceback. Subcommand modules add their own
error types to `USER_ERRORS` by raising subclasses of the ones below or of `UserError`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from launcher.errors import UserError

# Subcommand modules, in the order `dinolab --help` lists them.
COMMANDS = ("train", "eval", "viz", "export", "bench", "data", "sweep", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolab", description="DINO self-supervised ViT experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"launcher.commands.{name}").register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from dino.config.schema import ConfigError
    from dino.data.bad_images import UnreadableImageError
    from dino.data.datasets import DatasetNotFoundError
    from dino.io.checkpoint import CheckpointError, CheckpointWriteError
    from dino.io.distributed import DeviceError
    from dino.io.run_lock import LockLost, RunLocked
    from dino.io.storage import StorageError
    from dino.run.state import ConfigMismatchError
    from dino.run.train_metrics import NonFiniteLossError
    from launcher.sweep_file import SweepError
    from launcher.tracking_runs import TrackingUnavailable

    return (
        UserError,
        SweepError,
        TrackingUnavailable,
        ConfigError,
        DatasetNotFoundError,
        DeviceError,
        RunLocked,
        LockLost,
        ConfigMismatchError,
        NonFiniteLossError,
        CheckpointError,
        CheckpointWriteError,
        StorageError,
        UnreadableImageError,
    )


def one_line(err: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back with the worker's
    traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback ..."):
    its last line is the message the worker raised."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as err:
        print(f"dinolab {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
