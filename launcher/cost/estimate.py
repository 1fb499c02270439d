"""What a sweep will cost before it is queued: GPU-hours, wall-clock and peak memory per GPU.

Each stage of each run processes a known number of images (launcher/cost/images.py). Its GPU-hours
are images / (img/s per GPU) / 3600, its wall time that over the stage's GPUs (nodes x
gpus_per_node). The img/s per GPU of a run's shape on its card (launcher/cost/shapes.py) comes from,
in this order of trust:

1. measured: finished, running or preempted runs in the sweep's MLflow store (any experiment) with the same
   throughput-shaping keys (SHAPE_KEYS) on the same card: their logged `avg_img_per_s`
   (launcher/cost/measured.py);
2. calibrated: a `dinolab bench --save` record of that shape on that card (`<root>/bench.json`,
   launcher/cost/bench.py);
3. estimated: FLOPs per image, counted by torch's FLOP counter on the meta device (no compute, no
   GPU), at an assumed model FLOP utilisation of the card: a guess, and labelled as one
   (launcher/cost/flops.py).

A plan of 1,000 runs must stay fast, so nothing here is done per run that can be done per shape: one
MLflow query per sweep, one FLOP count per model shape (cached on disk across commands), one dataset
size per data root. Evaluations are always estimated (nothing measures their speed yet). The figures
themselves are launcher/cost/model.py; this module fills them in, shows them and checks the budget.
"""

from __future__ import annotations

import heapq
import json
from typing import Any

from launcher.cost.bench import bench_path, calibrated_speed, read_bench
from launcher.cost.flops import estimated_speed, flop_rate, forward_flops
from launcher.cost.images import Size, eval_images, pretrain_images
from launcher.cost.measured import measured_runs, measured_speed
from launcher.cost.model import ESTIMATED, UNKNOWN, BudgetExceeded, RunCost, Speed, StageCost, SweepCost
from launcher.cost.shapes import devices, shape_of, stage_card
from launcher.grid import RunSpec
from launcher.sweep import Sweep


def estimate(
    sweep: Sweep, runs: list[RunSpec], work: dict[str, tuple[float, list[str]]] | None = None
) -> SweepCost:
    """The cost of `runs`; `work` maps a run id to (fraction of its pretraining still to do,
    evaluations to run) for what a submission would queue; default: all of it, every evaluation."""
    measured, note = measured_runs(sweep.tracking_uri)
    bench = read_bench(bench_path(sweep))
    speeds: dict[tuple[str, ...], Speed] = {}
    eval_speeds: dict[tuple, tuple[int | None, Speed]] = {}
    world = devices(sweep, "pretrain")
    threads = sweep.stage_resources("pretrain").cpus_per_task
    out = []
    notes = [note] if note else []
    for run in runs:
        fraction, evals = (work or {}).get(run.run_id, (1.0, list(sweep.evals)))
        stages = []
        if fraction > 0:
            card = stage_card(sweep, "pretrain", run.config.train.device)
            shape = shape_of(run.config, card)
            if shape not in speeds:
                speeds[shape] = (measured_speed(shape, measured) or calibrated_speed(shape, bench)
                                 or estimated_speed(run.config, card, threads))  # fmt: skip
            size = pretrain_images(run.config, world)
            images = None if size.images is None else round(size.images * fraction)
            stages.append(StageCost("pretrain", images, world, speeds[shape], fraction, size.why))
            notes += [n for n in size.notes if n not in notes]
        for protocol in evals:
            size, speed = _eval_cost(sweep, run, protocol, eval_speeds)
            stages.append(StageCost(protocol, size.images, devices(sweep, protocol), speed, missing=size.why))
            notes += [n for n in size.notes if n not in notes]
        out.append(RunCost(run, stages))
    return SweepCost(out, _wall_hours(sweep, out), notes)


def _eval_cost(sweep: Sweep, run: RunSpec, protocol: str, cache: dict) -> tuple[Size, Speed]:
    """Images and forward speed of one evaluation, once per (protocol, data, model) of the sweep."""
    from dino.config.schema import to_dict
    from dino.eval.config import compose_eval

    cfg = run.config
    data = to_dict(cfg.data)
    key = (protocol, json.dumps(data, sort_keys=True), cfg.model.name, cfg.model.patch_size, cfg.crops.global_size,
           cfg.train.device, cfg.train.precision)  # fmt: skip
    if key not in cache:
        try:
            # The run folder does not matter to the cost; compose_eval only insists one is named.
            ecfg = compose_eval([*sweep.eval_overrides.get(protocol, []), "run.dir=PLACEHOLDER"], data)
        except Exception as err:  # noqa: BLE001 - the evaluation job reports it; the plan goes on
            cache[key] = (
                Size(None, f"evaluation config: {err}"),
                Speed(None, None, UNKNOWN, f"evaluation config: {err}"),
            )
            return cache[key]
        size = ecfg.image_size or cfg.crops.global_size
        card = stage_card(
            sweep, protocol, "cpu" if ecfg.device == "cpu" or cfg.train.device == "cpu" else "auto"
        )
        rate, how = flop_rate(card, cfg.train.precision, False, sweep.stage_resources(protocol).cpus_per_task)
        flops = forward_flops(cfg, size)
        detail = f"guess: {flops / 1e9:.3g} GFLOP/image forward at {size} px, {how}"
        cache[key] = (eval_images(protocol, ecfg), Speed(rate / flops, None, ESTIMATED, detail))
    return cache[key]


def _wall_hours(sweep: Sweep, runs: list[RunCost]) -> float | None:
    """Wall-clock of the whole submission: each array runs `array_parallelism` jobs at a time, in
    order; an evaluation starts once its own run's pretraining has ended and a slot is free."""
    slots = max(sweep.array_parallelism, 1)
    free = [0.0] * slots
    ends: dict[str, float] = {}
    for r in runs:
        pre = r.stage("pretrain")
        if pre is None:
            ends[r.run.run_id] = 0.0
            continue
        if pre.hours is None:
            return None
        start = heapq.heappop(free)
        ends[r.run.run_id] = start + pre.hours
        heapq.heappush(free, ends[r.run.run_id])
    total = max(ends.values(), default=0.0)
    for protocol in sweep.evals:
        free = [0.0] * slots
        for r in runs:
            stage = r.stage(protocol)
            if stage is None:
                continue
            if stage.hours is None:
                return None
            end = max(heapq.heappop(free), ends[r.run.run_id]) + stage.hours
            heapq.heappush(free, end)
            total = max(total, end)
    return total


# --------------------------------------------------------------------------------------------------
# Output and the budget
# --------------------------------------------------------------------------------------------------


def hours_text(hours: float | None) -> str:
    """A duration for people: 40 s, 12 min, 5.2 h, 3.1 d."""
    if hours is None:
        return "?"
    seconds = hours * 3600
    if seconds < 90:
        return f"{seconds:.0f} s"
    if hours < 1.5:
        return f"{seconds / 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"


def gpu_hours_text(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def cost_table(sweep: Sweep, cost: SweepCost):
    """Per run: GPU-hours (all stages), wall time of its jobs, peak memory per GPU, img/s per GPU of
    its pretraining and where that comes from."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"cost of sweep {sweep.name}", title_justify="left")
    for col in ("run", "GPU-hours", "wall", "peak mem/GPU", "img/s/GPU", "source"):
        table.add_column(col)
    for r in cost.runs:
        pre = r.stage("pretrain")
        rate = f"{pre.speed.img_per_s:,.0f}" if pre and pre.speed.img_per_s else "-"
        memory = f"{r.memory_gib:.1f} GiB" if r.memory_gib is not None else "?"
        table.add_row(
            Text(r.run.name), gpu_hours_text(r.gpu_hours), hours_text(r.hours), memory, rate, r.source
        )
    return table


def summary_lines(sweep: Sweep, cost: SweepCost) -> list[str]:
    """The total, the wall-clock with the sweep's parallelism, and where every figure comes from."""
    stages = ", ".join(f"{name} {gpu_hours_text(v)}" for name, v in cost.by_stage().items())
    total = gpu_hours_text(cost.gpu_hours)
    if cost.unknown:
        total = f"at least {total} ({len(cost.unknown)} run(s) of unknown cost)"
    res = sweep.stage_resources("pretrain")
    unit = "GPU(s)" if res.gpus_per_node else "CPU process(es)"
    lines = [
        f"cost: {total} GPU-hours ({stages}); wall-clock {hours_text(cost.wall_hours)} with array_parallelism "
        f"{sweep.array_parallelism}, {devices(sweep, 'pretrain')} {unit} per pretraining job"
    ]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in cost.runs:
        for s in r.stages:
            rate = f"{s.speed.img_per_s:,.0f} img/s per GPU" if s.speed.img_per_s else "no speed"
            groups.setdefault((s.stage, f"{s.speed.source}, {rate}", s.speed.detail), []).append(r.run.name)
    for (stage, source, detail), names in groups.items():
        which = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
        lines.append(f"  {stage} of {which}: {source}: {detail}")
    if cost.unknown:
        lines.append(f"  unknown: {_unknown_reason(cost.unknown[0])}")
    lines += [f"  note: {n}" for n in cost.notes]
    return lines


def _unknown_reason(r: RunCost) -> str:
    stage = next(s for s in r.stages if s.gpu_hours is None)
    if stage.images is None:
        why = stage.missing or "the dataset is not readable here, so its size is unknown"
        return f"{r.run.name} {stage.stage}: {why}"
    return f"{r.run.name} {stage.stage}: {stage.speed.detail}"


def check_budget(sweep: Sweep, cost: SweepCost, limit: float, origin: str) -> None:
    """Refuse (BudgetExceeded, exit 2) a submission estimated over `limit` GPU-hours, or one whose
    cost cannot be estimated, naming the most expensive runs; nothing has been queued yet."""
    if cost.unknown:
        raise BudgetExceeded(
            f"{sweep.path}: {origin} is {limit:g} GPU-hours but {len(cost.unknown)} run(s) have no estimate "
            f"({_unknown_reason(cost.unknown[0])}); nothing was submitted"
        )
    if cost.gpu_hours <= limit:
        return
    top = ", ".join(
        f"{r.run.name} ({gpu_hours_text(r.gpu_hours)}, {r.source})" for r in cost.most_expensive(3)
    )
    raise BudgetExceeded(
        f"{sweep.path}: this submission is estimated at {gpu_hours_text(cost.gpu_hours)} GPU-hours for "
        f"{len(cost.runs)} run(s), over {origin} of {limit:g}; most expensive: {top}. Nothing was submitted: "
        "submit fewer runs (--run, --only) or raise the limit"
    )


def record_fields(r: RunCost) -> dict[str, Any]:
    """What a submission keeps of a run's estimate (record.json, MLflow tags) for `status` and
    `report` to set the GPU-hours spent beside: its whole pretraining's."""
    pre = r.stage("pretrain")
    if pre is None or pre.gpu_hours is None or pre.fraction <= 0:
        return {}
    return {"estimate_gpu_hours": pre.gpu_hours / pre.fraction, "estimate_source": pre.speed.source}
