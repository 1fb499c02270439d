"""How long `dinolab sweep plan` and `sweep status` take on a 1,000-run search (issue 21's target:
plan <= 3 s, status <= 2 s on the 2-core CI machine), or a 10,000-run one with --seeds 100 (issue
30's: both under 5 s).

    python scripts/bench_sweep_scale.py [--seeds 10] [--repeat 3] [--folder DIR]

The grid: 5 teacher momenta x 5 learning rates x 4 local-crop counts x N seeds of the quickstart's
tiny model. `plan` is timed on the fresh sweep (nothing submitted: every run is composed). Then the
sweep is made to look submitted the way `sweep submit` leaves it, without running anything: the
manifest, and in every run folder a jobs.json (a local job whose process is gone), a record.json
(70% completed with a k-NN record and result, 15% running, 10% failed, 5% never started) — and
`status` is timed reading it. Each figure is the wall time of the real command in a fresh process
(Python start and imports included): the best of --repeat, and each. --folder keeps the sweep file
and its runs there (to profile a command on them: `python -m cProfile -m launcher.cli sweep plan
DIR/scale.yaml`; `plan` then shows the runs as submitted); by default they go to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sweep_file(folder: Path, seeds: int) -> Path:
    sweep = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    sweep.pop("zip")
    sweep.update(
        name="scale",
        root=str(folder / "runs"),
        grid={
            "teacher.momentum": [0.9, 0.95, 0.99, 0.996, 0.999],
            "optim.lr": [0.001, 0.002, 0.005, 0.01, 0.02],
            "crops.num_local": [0, 2, 4, 6],
        },
        short_names={"teacher.momentum": "m", "optim.lr": "lr", "crops.num_local": "nl"},
        seeds=list(range(seeds)),
    )
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def timed(args: list[str], repeat: int) -> tuple[list[float], str]:
    """Wall seconds of each of `repeat` runs of the command, and its output."""
    times, out = [], ""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, cwd=REPO
        )
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            sys.exit(f"dinolab {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        out = done.stdout
    return times, out


def figures(times: list[float]) -> str:
    rest = f", then {', '.join(f'{t:.2f}' for t in times[1:])} s" if len(times) > 1 else ""
    return f"{min(times):.2f} s (first {times[0]:.2f} s{rest})"


def look_submitted(path: Path) -> int:
    """Write what `sweep submit` and the jobs would have left, for every run; returns the count."""
    sys.path.insert(0, str(REPO))
    from launcher import manifest, records
    from launcher.grid import expand
    from launcher.sweep_file import load_sweep

    sweep = load_sweep(path)
    runs = expand(sweep)
    manifest.write(sweep, runs)
    dead_pid = _dead_pid()
    for i, run in enumerate(runs):
        kind = i % 20
        if kind == 19:
            continue  # never started
        records.add_job(run.run_dir, "pretrain", str(dead_pid), "local", "/dev/null", "/dev/null")
        state = records.COMPLETED if kind < 14 else records.RUNNING if kind < 17 else records.FAILED
        records.update_record(
            run.run_dir, state=state, step=128 if state == records.COMPLETED else 64, total_steps=128,
            loss=5.2, requeues=i % 3,
            error="RuntimeError: CUDA error: an illegal memory access" if state == records.FAILED else None,
        )  # fmt: skip
        if state == records.COMPLETED:
            records.add_job(run.run_dir, "knn", str(dead_pid), "local", "/dev/null", "/dev/null")
            records.set_eval_state(run.run_dir, "knn", records.COMPLETED)
            result = Path(run.run_dir) / "eval" / "knn" / "teacher-step128.json"
            result.parent.mkdir(parents=True, exist_ok=True)
            result.write_text(json.dumps({"top1": {"10": 70.5, "20": 71.25}, "time": time.time()}))
    return len(runs)


def _dead_pid() -> int:
    """The pid of a process that has ended (a local job whose controller is gone)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=10, help="seeds per grid point (100 points): 10 = 1,000 runs"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="keep the sweep file and its runs here (a new folder)")
    args = parser.parse_args()
    if args.folder is not None:
        args.folder.mkdir(parents=True)  # a folder with runs in it already would not time a fresh plan
    with contextlib.nullcontext(args.folder) if args.folder else tempfile.TemporaryDirectory() as tmp:
        path = sweep_file(Path(tmp).resolve(), args.seeds)
        plan_s, out = timed(["sweep", "plan", str(path)], args.repeat)
        rows = sum(1 for line in out.splitlines() if " new " in line and line.lstrip("│ ").startswith("m0."))
        start = time.perf_counter()
        count = look_submitted(path)
        print(f"(made {count} runs look submitted in {time.perf_counter() - start:.1f} s)", file=sys.stderr)
        status_s, out = timed(["sweep", "status", str(path)], args.repeat)
        caption = out.strip().splitlines()[-1].strip()
    print(f"{count} runs, {rows} planned as new; status: {caption}")
    print(f"sweep plan   {figures(plan_s)}")
    print(f"sweep status {figures(status_s)}")


if __name__ == "__main__":
    main()
