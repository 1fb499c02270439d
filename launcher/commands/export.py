"""`dinolab export RUN_DIR|SWEEP_FILE [--run NAME] -o OUT`: a run's teacher backbone for other code."""

from __future__ import annotations

import argparse

EPILOG = """\
--format timm (default) writes OUT.safetensors in timm's layout; --format reference writes OUT.pth in the
layout of the reference DINO's released *_pretrain.pth. OUT.<suffix>.json beside it holds the
architecture, the timm.create_model call, step, config hash and the run's k-NN/linear results.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's teacher backbone as timm .safetensors or the reference's .pth",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a run folder, or a sweep file with --run")
    p.add_argument("--run", default="", help="sweep file: the run (name, id or name-id)")
    p.add_argument("-o", "--out", required=True, help="output file (suffix added when missing)")
    p.add_argument("--format", default="timm", choices=["timm", "reference"])
    p.add_argument(
        "--step", type=int, default=None, help="this checkpoint step (default: the newest complete)"
    )
    p.set_defaults(func=run_command)


def _run_dir(args: argparse.Namespace) -> str:
    from launcher.errors import UserError

    if not args.source.endswith((".yaml", ".yml")):
        return args.source
    from launcher.grid import expand, select
    from launcher.sweep_file import load_sweep

    runs = select(expand(load_sweep(args.source)), [args.run] if args.run else None)
    if len(runs) != 1:
        raise UserError(
            f"name one run with --run (the sweep has {len(runs)}: {', '.join(r.name for r in runs)})"
        )
    return runs[0].run_dir


def run_command(args: argparse.Namespace) -> int:
    from dino.tools.export import export_backbone

    exported = export_backbone(_run_dir(args), args.out, args.format, args.step)
    arch = exported.sidecar["architecture"]
    print(
        f"exported the teacher backbone of {exported.sidecar['checkpoint']} (step {exported.sidecar['step']}) to {exported.path}"
    )
    print(f"description: {exported.path}.json")
    if args.format == "timm":
        kwargs = ", ".join(f"{k}={v!r}" for k, v in arch["timm_kwargs"].items())
        print(
            f'load it: timm.create_model("{arch["timm_name"]}", pretrained=True, '
            f'pretrained_cfg_overlay={{"file": "{exported.path}"}}, {kwargs})'
        )
    else:
        print(
            f"load it: dinolab eval knn weights={exported.path} data=..., or torch.load into the reference's vit"
        )
    return 0
