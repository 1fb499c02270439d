"""`dinolab data pack SRC OUT`: a dataset as webdataset shards (for object stores and fast reads)."""

from __future__ import annotations

import argparse
import time

EPILOG = """\
SRC is an image folder (<SRC>/<class>/<image>, local or s3://) or fashion_mnist[:train|test] (Debian's
dataset-fashion-mnist, or --root). OUT is a folder or an s3:// prefix; it receives shard-000000.tar, ...
and index.json (written last). Train on it with data=webdataset data.root=OUT.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="dataset tools (pack an image folder into shards)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser(
        "pack",
        help="write a dataset as webdataset tar shards + index.json",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="image folder, or fashion_mnist[:train|test]")
    p.add_argument("out", help="output folder or s3:// prefix")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled pack order (default 0)")
    p.add_argument("--limit", type=int, default=0, help="pack only the first N images (default all)")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="fashion_mnist: idx folder")
    p.add_argument(
        "--on-bad-image",
        choices=("skip", "fail"),
        default="skip",
        help="an image folder's file that cannot be decoded is left out (listed in index.json as "
        "skipped) or stops the pack, naming it (default skip)",
    )
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import Progress

    from dino.data import shards
    from dino.data.datasets import FashionMNIST, ImageFolder
    from launcher.errors import UserError

    if args.shard_size <= 0:
        raise UserError(f"--shard-size={args.shard_size} must be positive")
    if args.source.startswith("fashion_mnist"):
        split = args.source.partition(":")[2] or "train"
        dataset = FashionMNIST(args.root, split)
        classes = None
    else:
        dataset = ImageFolder(args.source, on_bad_image=args.on_bad_image, option="--on-bad-image")
        classes = dataset.classes
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    start = time.monotonic()
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("packing", total=None)
            index = shards.pack(
                dataset, args.out, args.shard_size, args.seed, classes, args.source,
                on_shard=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
    except FileExistsError as err:
        raise UserError(str(err)) from None
    total_bytes = sum(s["bytes"] for s in index["shards"])
    print(
        f"packed {index['num_samples']} images of {len(index['classes'])} classes into "
        f"{len(index['shards'])} shards ({total_bytes / 1e6:.1f} MB) at {args.out} "
        f"in {time.monotonic() - start:.1f} s"
    )
    if index["skipped"]:
        names = ", ".join(index["skipped"][:5]) + (", ..." if len(index["skipped"]) > 5 else "")
        print(f"left out {len(index['skipped'])} unreadable image(s), listed in index.json: {names}")
    return 0
