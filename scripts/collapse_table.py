"""When would the collapse guard fire? Replays runs' metrics.jsonl through dino/method/collapse.py.

    PYTHONPATH=$PWD .venv/bin/python scripts/collapse_table.py FOLDER [--train] [--fm-steps 1500]

--train first trains the runs of RUNS that FOLDER lacks (`dinolab train ... train.collapse_stop=false`,
one after the other: the whole curve, whatever the guard would say), then every FOLDER/<run> with a
metrics.jsonl is replayed: the windows the train loop logged (every train.log_every steps) through
the rule with the current defaults of the train.collapse_* keys, or the values given here. Prints a
Markdown table (docs/collapse.md holds the measured one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dino.config.schema import TrainConfig, from_dict  # noqa: E402
from dino.method.collapse import CollapseGuard, CollapseRule  # noqa: E402

# sweeps/quickstart.yaml's base (the grid below), and the Fashion-MNIST acceptance recipe
# (tests/integration/fashion_mnist_run.py) as one process of batch 64 (the same global batch and
# schedule as its 2 x 32), cut at --fm-steps: its warm-up alone is 937 steps.
QUICKSTART = [
    "data=fashion_mnist", "data.limit=4096", "model=vit_test", "crops.global_size=32", "crops.local_size=16",
    "head.out_dim=1024", "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=0.005", "train.workers=1",
    "train.precision=fp32", "train.device=cpu", "train.log_every=10",
]  # fmt: skip
FASHION_MNIST = [
    "data=fashion_mnist", "model=vit_test", "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
    "head.out_dim=4096", "head.hidden_dim=512", "head.bottleneck_dim=128", "optim.batch_size=64",
    "optim.epochs=5", "optim.warmup_epochs=1", "optim.lr=0.005", "teacher.momentum=0.996", "train.seed=1",
    "train.log_every=10", "train.workers=0", "train.precision=fp32", "train.device=cpu",
    "data.augment_device=gpu",
]  # fmt: skip
TEMP_008 = ["teacher.temp=0.08", "teacher.warmup_temp=0.08"]  # the paper's collapsing temperature, fixed
RUNS = {
    "qs-m0.996-nl0-bs32": [*QUICKSTART, "teacher.momentum=0.996", "crops.num_local=0", "optim.batch_size=32"],
    "qs-m0.996-nl2-bs24": [*QUICKSTART, "teacher.momentum=0.996", "crops.num_local=2", "optim.batch_size=24"],
    "qs-m0.9-nl0-bs32": [*QUICKSTART, "teacher.momentum=0.9", "crops.num_local=0", "optim.batch_size=32"],
    "qs-m0.9-nl2-bs24": [*QUICKSTART, "teacher.momentum=0.9", "crops.num_local=2", "optim.batch_size=24"],
    "qs-m0-nl2-bs24": [*QUICKSTART, "teacher.momentum=0", "crops.num_local=2", "optim.batch_size=24"],
    "qs-t0.08-nl2-bs24": [
        *QUICKSTART,
        *TEMP_008,
        "teacher.momentum=0.996",
        "crops.num_local=2",
        "optim.batch_size=24",
    ],  # fmt: skip
    # Known collapses, to see the rule fire: no centring (one dimension), no sharpening (uniform).
    "qs-nocenter-nl0-bs32": [
        *QUICKSTART,
        "teacher.momentum=0.996",
        "teacher.center_momentum=1",
        "crops.num_local=0",
        "optim.batch_size=32",
    ],  # fmt: skip
    "qs-nosharp-nl0-bs32": [
        *QUICKSTART,
        "teacher.momentum=0.996",
        "teacher.temp=0.1",
        "teacher.warmup_temp=0.1",
        "crops.num_local=0",
        "optim.batch_size=32",
    ],  # fmt: skip
    # The tests' collapsing run (tests/integration/test_collapse_cli.py): no centring, no momentum.
    "tiny-m0-nocenter": [
        "model=vit_test",
        "data=synthetic",
        "data.num_samples=64",
        "data.image_size=32",
        "optim.batch_size=8",
        "optim.epochs=2",
        "train.device=cpu",
        "head.out_dim=64",
        "teacher.momentum=0",
        "teacher.center_momentum=1",
        "optim.lr=0.05",
        "optim.warmup_epochs=0",
        "train.log_every=2",
        "train.workers=0",
    ],  # fmt: skip
    "fm-base": FASHION_MNIST,
    "fm-m0": [*FASHION_MNIST, "teacher.momentum=0"],
    "fm-t0.08": [*FASHION_MNIST, *TEMP_008],
}


KEYS = ("patience_steps", "uniform_margin", "one_dim_fraction", "kl_flat", "kl_range")


def train(folder: Path, fm_steps: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name, overrides in RUNS.items():
        run_dir = folder / name
        if (run_dir / "metrics.jsonl").exists():
            continue
        extra = [f"train.max_steps={fm_steps}"] if name.startswith("fm-") else []
        cmd = [sys.executable, "-m", "launcher.cli", "train", *overrides, *extra, "train.collapse_stop=false",
               "train.progress=false", f"run.dir={run_dir}"]  # fmt: skip
        print(f"training {name}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=REPO, env=env)


def replay(run_dir: Path, keys: dict[str, float]) -> dict[str, object]:
    """One row: the run's shape, its entropy and KL after the warm-up, and when the rule fires."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["train"].update(keys)
    cfg = from_dict(saved)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spe = round(metrics[-1]["step"] / metrics[-1]["epoch"])
    rule = CollapseRule.from_config(
        cfg.train, cfg.head.out_dim, (cfg.optim.warmup_epochs, cfg.teacher.warmup_temp_epochs), spe
    )
    guard = CollapseGuard(rule)
    fired, onset = None, None
    for m in metrics:
        decision = guard.update(m["step"], m["teacher_entropy"], m["kl"])
        if onset is None and guard.kind:
            onset = f"{guard.kind} @{guard.since}"
        if decision is not None and fired is None:
            fired = decision
    after = [m for m in metrics if m["step"] - cfg.train.log_every >= rule.warmup_steps]
    log_k = math.log(cfg.head.out_dim)
    if not after:  # still in the warm-up: nothing is judged yet
        after = [{"teacher_entropy": float("nan"), "kl": float("nan")}]
    return {
        "run": run_dir.name,
        "steps (of planned)": f"{metrics[-1]['step']} ({spe * cfg.optim.epochs})",
        "warm-up": rule.warmup_steps,
        "ln K": f"{log_k:.3f}",
        "entropy after warm-up (min–max)": f"{min(m['teacher_entropy'] for m in after):.3f}–"
        f"{max(m['teacher_entropy'] for m in after):.3f}",
        "KL after warm-up (min)": f"{min(m['kl'] for m in after):.3f}",
        "final entropy / KL": f"{metrics[-1]['teacher_entropy']:.3f} / {metrics[-1]['kl']:.3f}",
        "first signal": onset or "never",
        "fires at": f"step {fired.step} ({fired.kind})" if fired else "never",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--train", action="store_true", help="first train the runs the folder lacks")
    parser.add_argument("--fm-steps", type=int, default=1300, help="Fashion-MNIST runs stop here")
    defaults = TrainConfig()
    for key in KEYS:
        value = getattr(defaults, f"collapse_{key}")
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    if args.train:
        train(args.folder, args.fm_steps)
    keys = {f"collapse_{k}": getattr(args, k) for k in KEYS}
    rows = [replay(d, keys) for d in sorted(args.folder.iterdir()) if (d / "metrics.jsonl").exists()]
    print(", ".join(f"train.{k}={v}" for k, v in keys.items()))
    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
