"""`dinolab viz attention [overrides...]`: per-head CLS attention of the last block, as a PNG."""

from __future__ import annotations

import argparse

EPILOG = """\
overrides: run.dir=<run> (newest complete checkpoint), checkpoint=<run>/checkpoints/<step>, or weights=<file>
[weights_key=teacher|student] (the reference's .pth, timm .safetensors, dinolab exports);
image=<file> (required), out=<png> (default attention.png), image_size (default: the run's
crops.global_size), device=auto|cpu|cuda.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("viz", help="figures of a checkpoint (attention maps)")
    kinds = parser.add_subparsers(dest="figure", required=True)
    p = kinds.add_parser(
        "attention",
        help="last block's CLS-to-patch attention per head, overlaid on an image",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="e.g. run.dir=runs/a image=photo.jpg out=attn.png")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from dino.run.progress import setup_logging
    from dino.tools.viz import attention_figure

    setup_logging()  # progress and resume messages on stderr

    result = attention_figure(args.overrides)
    width, height = result.size
    print(
        f"wrote {result.out} ({width}x{height} px, image + {result.num_heads} heads) from "
        f"{result.checkpoint} (step {result.step}, config {result.config_hash})"
    )
    return 0
