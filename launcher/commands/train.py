"""`dinolab train [overrides...]`: compose a config and pretrain (or resume) one run."""

from __future__ import annotations

import argparse

EPILOG = """\
overrides are key=value, read as YAML values (the syntax of eval, viz and sweep files): presets
(model=vit_small, data=fashion_mnist) and keys (optim.epochs=10 optim.lr=1e-3 crops.global_scale=[0.4,1.0]
run.dir=runs/a). Groups: model={vit_test,vit_tiny,vit_small,vit_base},
data={synthetic,fashion_mnist,imagefolder,webdataset}. Show the resolved config with --cfg.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="pretrain (or resume) one DINO run",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. model=vit_test optim.epochs=2"
    )
    parser.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import yaml

    from dino.config.compose import compose
    from dino.config.schema import to_dict

    cfg = compose(args.overrides)
    if args.cfg:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from dino.run.train import run

    result = run(cfg)
    if result.collapsed is not None:  # a decision, not a failure: exit 0
        c = result.collapsed
        print(
            f"collapsed: stopped at step {c['step']}/{c['total_steps']} in {result.run_dir} ({c['signal']}); "
            "the final checkpoint is that step's. To train on anyway: the same command with "
            "train.collapse_stop=false"
        )
        return 0
    last = result.last_metrics
    summary = (
        f"loss {last['loss']:.4f}, teacher entropy {last['teacher_entropy']:.3f}" if last else "nothing to do"
    )
    if result.finished:
        state = "finished"
    elif result.stopped:
        state = "stopped on request (run the same command to continue)"
    else:
        state = f"stopped at train.max_steps={result.step} (raise it and run again to continue)"
    print(f"{state}: step {result.step}/{result.total_steps} in {result.run_dir} ({summary})")
    return 0
