"""What a sweep will cost before it is queued: GPU-hours, wall-clock and peak memory per GPU, and the
budget a submission is checked against.

Each stage of each run processes a known number of images. Its GPU-hours are images / (img/s per GPU)
/ 3600, its wall time that over the stage's GPUs (nodes x gpus_per_node); the submission's wall-clock
runs `array_parallelism` jobs of each array at a time. The img/s per GPU of a run's shape on its card
come from launcher/cost/speeds.py, in this order of trust: measured by runs of that shape in MLflow,
calibrated by `dinolab bench --save`, estimated from FLOPs (a guess, labelled as one). Evaluations are
always estimated (nothing measures their speed yet).

The images: pretraining, epochs x the dataset as the train loop counts steps; k-NN, bank + queries
once; linear, the test split once plus the train split every epoch. A dataset's size is counted where
`plan` runs (an image folder's files, a shard index). Where it cannot be (ImageNet is not mounted on a
laptop), `data.num_images` gives it: N for data.root, or {train: N, val: M} adding data.val_root, the
evaluations' test split. The count on disk is the truth: a `num_images` that disagrees with it is
reported in a note and not used. A size known from neither is unknown (`?`), and the reason names the
key that prices it.

A plan of 1,000 runs must stay fast, so nothing here is done per run that can be done per shape: one
MLflow query per sweep, one FLOP count per model shape (cached on disk across commands), one dataset
size per data root.

The module holds, in order: the cost records (plain arithmetic: a stage's, a run's and the whole
sweep's GPU-hours and wall time), `estimate` that fills them in, the card and GPUs of a stage, the
images of a stage, and what the commands show of an estimate and the budget check (`cost_table`,
`summary_lines`, `check_budget`, `record_fields`).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import operator
from dataclasses import dataclass, field
from typing import Any

from dino.config.schema import DataConfig, DinoConfig, to_dict
from dino.io import storage
from dino.run import accelerators
from launcher.cost.speeds import (
    ESTIMATED,
    UNKNOWN,
    UNKNOWN_GPU,
    Speed,
    bench_path,
    calibrated_speed,
    estimated_speed,
    flop_rate,
    forward_flops,
    measured_runs,
    measured_speed,
    read_bench,
    shape_of,
)
from launcher.errors import UserError
from launcher.grid import RunSpec
from launcher.sweep_file import Sweep

# --------------------------------------------------------------------------------------------------
# The cost records: plain arithmetic
# --------------------------------------------------------------------------------------------------


class BudgetExceeded(UserError):
    """A submission whose estimate is over `--max-gpu-hours` or the sweep's `budget:`."""


@dataclass
class StageCost:
    stage: str
    images: int | None  # None: the dataset's size is unknown here
    devices: int
    speed: Speed
    fraction: float = 1.0  # of the whole stage: a resumed run's pretraining has only the rest to do
    missing: str = ""  # images None: what is missing and the key that fixes it

    @property
    def gpu_hours(self) -> float | None:
        """The images at the stage's rate, plus the job's fixed seconds on each of its GPUs."""
        if self.images is None or not self.speed.img_per_s:
            return None
        return self.images / self.speed.img_per_s / 3600 + self.fixed_gpu_hours

    @property
    def fixed_gpu_hours(self) -> float:
        """What the stage's job pays once, whatever its length (measured speeds only: `Speed.fixed_s`)."""
        return self.speed.fixed_s * self.devices / 3600

    @property
    def hours(self) -> float | None:
        gpu_hours = self.gpu_hours
        return None if gpu_hours is None else gpu_hours / self.devices


def _total(values: list[float | None]) -> float | None:
    """The sum, or None (unknown) when any part is unknown."""
    return None if None in values else sum(values)


@dataclass
class RunCost:
    run: RunSpec
    stages: list[StageCost]

    def stage(self, name: str) -> StageCost | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def gpu_hours(self) -> float | None:
        return _total([s.gpu_hours for s in self.stages])

    @property
    def hours(self) -> float | None:
        """Wall time of the run's own jobs one after the other (pretraining, then each evaluation)."""
        return _total([s.hours for s in self.stages])

    @property
    def memory_gib(self) -> float | None:
        values = [s.speed.memory_gib for s in self.stages if s.speed.memory_gib is not None]
        return max(values) if values else None

    @property
    def source(self) -> str:
        """The pretraining's source (the stage that costs most), else the first stage's."""
        stage = self.stage("pretrain") or (self.stages[0] if self.stages else None)
        return stage.speed.source if stage else "-"


@dataclass
class SweepCost:
    runs: list[RunCost]
    wall_hours: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours or 0.0 for r in self.runs)

    @property
    def unknown(self) -> list[RunCost]:
        return [r for r in self.runs if r.gpu_hours is None]

    def by_stage(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for r in self.runs:
            for s in r.stages:
                totals[s.stage] = totals.get(s.stage, 0.0) + (s.gpu_hours or 0.0)
        return totals

    def fixed(self, stage: str) -> float:
        """The part of a stage's GPU-hours its jobs pay once each (a search pays it per rung job)."""
        return sum(s.fixed_gpu_hours for r in self.runs for s in r.stages if s.stage == stage and s.gpu_hours)

    def most_expensive(self, n: int = 3) -> list[RunCost]:
        return sorted(self.runs, key=lambda r: -(r.gpu_hours or 0.0))[:n]


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def estimate(
    sweep: Sweep, runs: list[RunSpec], work: dict[str, tuple[float, list[str]]] | None = None
) -> SweepCost:
    """The cost of `runs`; `work` maps a run id to (fraction of its pretraining still to do,
    evaluations to run) for what a submission would queue; default: all of it, every evaluation."""
    measured, note = measured_runs(sweep.tracking_uri)
    bench = read_bench(bench_path(sweep))
    speeds: dict[tuple[str, ...], Speed] = {}
    sizes: dict[tuple, _Size] = {}
    eval_speeds: dict[tuple, tuple[_Size, Speed]] = {}
    cards: dict[tuple[str, str], str] = {}
    devices = {stage: _devices(sweep, stage) for stage in ("pretrain", *sweep.evals)}
    world = devices["pretrain"]
    threads = sweep.stage_resources("pretrain").cpus_per_task
    out = []
    notes = [note] if note else []
    for run in runs:
        cfg = run.config
        data = _data_key(cfg.data)
        fraction, evals = (work or {}).get(run.run_id, (1.0, list(sweep.evals)))
        stages = []
        if fraction > 0:
            device = cfg.train.device
            if ("pretrain", device) not in cards:
                cards["pretrain", device] = _stage_card(sweep, "pretrain", device)
            card = cards["pretrain", device]
            shape = shape_of(cfg, card)
            if shape not in speeds:
                speeds[shape] = (measured_speed(shape, measured) or calibrated_speed(shape, bench)
                                 or estimated_speed(cfg, card, threads))  # fmt: skip
            # What `_pretrain_images` reads: the data, the batch and the schedule's length.
            key = (data, cfg.optim.batch_size, cfg.optim.epochs, cfg.train.max_steps)
            if key not in sizes:
                sizes[key] = _pretrain_images(cfg, world)
            size = sizes[key]
            images = None if size.images is None else round(size.images * fraction)
            stages.append(StageCost("pretrain", images, world, speeds[shape], fraction, size.why))
            notes += [n for n in size.notes if n not in notes]
        for protocol in evals:
            size, speed = _eval_cost(sweep, run, protocol, eval_speeds, data)
            stages.append(StageCost(protocol, size.images, devices[protocol], speed, missing=size.why))
            notes += [n for n in size.notes if n not in notes]
        out.append(RunCost(run, stages))
    return SweepCost(out, _wall_hours(sweep, out), notes)


# Every field of the data section, whatever its `repr` flag: `_data_key`.
_DATA_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(DataConfig)))


def _data_key(data: DataConfig) -> str:
    """One string per distinct data section, to look up what it decides once per sweep rather than
    once per run. `repr` tells apart every value `json.dumps` of `to_dict` does (and a list from a
    tuple, 1 from 1.0: at worst one more look-up), at a tenth of its cost for 10,000 runs."""
    return repr(_DATA_FIELDS(data))


def _eval_cost(sweep: Sweep, run: RunSpec, protocol: str, cache: dict, data_key: str) -> tuple[_Size, Speed]:
    """Images and forward speed of one evaluation, once per (protocol, data, model) of the sweep;
    `data_key`: `_data_key(run.config.data)`."""
    from dino.eval.config import compose_eval

    cfg = run.config
    key = (protocol, data_key, cfg.model.name, cfg.model.patch_size, cfg.crops.global_size,
           cfg.train.device, cfg.train.precision)  # fmt: skip
    if key not in cache:
        data = to_dict(cfg.data)
        try:
            # The run folder does not matter to the cost; compose_eval only insists one is named.
            ecfg = compose_eval([*sweep.eval_overrides.get(protocol, []), "run.dir=PLACEHOLDER"], data)
        except Exception as err:  # noqa: BLE001 - the evaluation job reports it; the plan goes on
            cache[key] = (
                _Size(None, f"evaluation config: {err}"),
                Speed(None, None, UNKNOWN, f"evaluation config: {err}"),
            )
            return cache[key]
        size = ecfg.image_size or cfg.crops.global_size
        card = _stage_card(
            sweep, protocol, "cpu" if ecfg.device == "cpu" or cfg.train.device == "cpu" else "auto"
        )
        rate, how = flop_rate(card, cfg.train.precision, False, sweep.stage_resources(protocol).cpus_per_task)
        flops = forward_flops(cfg, size)
        detail = f"guess: {flops / 1e9:.3g} GFLOP/image forward at {size} px, {how}"
        cache[key] = (_eval_images(protocol, ecfg), Speed(rate / flops, None, ESTIMATED, detail))
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
# Where a stage runs: its card and its GPUs
# --------------------------------------------------------------------------------------------------


def _devices(sweep: Sweep, stage: str) -> int:
    """GPUs of one job of the stage (nodes x gpus_per_node); CPU jobs count their processes."""
    res = sweep.stage_resources(stage)
    per_node = res.gpus_per_node or max(res.tasks_per_node, 1)
    return max(res.nodes, 1) * per_node


def _stage_card(sweep: Sweep, stage: str, device: str) -> str:
    """The card a stage's jobs run on: cpu when the config or the resources ask for no GPU, else a
    card named in the SLURM constraint, partition or extra parameters (e.g. `constraint: h100`,
    `additional: {gres: "gpu:a100:8"}`), else UNKNOWN_GPU."""
    res = sweep.stage_resources(stage)
    if device == "cpu" or not res.gpus_per_node:
        return accelerators.CPU
    return (
        accelerators.find_card(" ".join([res.constraint, res.partition, json.dumps(res.additional)]))
        or UNKNOWN_GPU
    )


# --------------------------------------------------------------------------------------------------
# Images each stage processes
# --------------------------------------------------------------------------------------------------


_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
_NUM_IMAGES_FORM = "an integer or {train: N, val: M}"


@dataclass(frozen=True)
class _Size:
    """A number of images, or None with `why` (what is missing and the key that fixes it); `notes`:
    what the plan should say about where the number comes from."""

    images: int | None
    why: str = ""
    notes: tuple[str, ...] = ()


_SIZES: dict[tuple, _Size] = {}


def _dataset_size(data: DataConfig, split: str) -> _Size:
    """Images of a split, read once per data root: counted on disk, else `data.num_images`."""
    val = split != "train" and bool(getattr(data, "val_root", ""))
    root = data.val_root if val else data.root
    given = getattr(data, "num_images", None)
    if split != "train" and not val:
        given = None  # N counts the train split: a test split read from data.root is not N's to price
    key = (data.name, root, split, data.num_samples, repr(given))
    if key not in _SIZES:
        _SIZES[key] = _size(data, root, split, "val" if val else "train", given)
    size = _SIZES[key]
    if size.images is not None and split == "train" and data.limit:
        size = dataclasses.replace(size, images=min(size.images, data.limit))
    return size


def _size(data: DataConfig, root: str, split: str, part: str, given: Any) -> _Size:
    root_key = "data.val_root" if part == "val" else "data.root"
    declared, problem = _declared(given, part)
    counted = _count(data.name, root, split, data.num_samples)
    if counted is not None:
        if problem:
            return _Size(
                counted, notes=(f"{problem}: ignored, {root_key} {root} holds {counted:,} images here",)
            )
        if declared is not None and declared != counted:
            return _Size(counted, notes=(
                f"{_key(part, given)}={declared:,} but {root_key} {root} holds {counted:,} images here: "
                f"the count on disk is used",
            ))  # fmt: skip
        return _Size(counted)
    where = f"{root_key} {root!r} is not readable here, so its size is unknown"
    if problem:
        return _Size(None, f"{where}, and {problem}")
    if declared is None:
        fix = "data.num_images=<N>" if part == "train" else "data.num_images={train: <N>, val: <M>}"
        return _Size(None, f"{where}: set {fix} to price it")
    return _Size(
        declared, notes=(f"{root_key} {root} is not readable here: {_key(part, given)}={declared:,} used",)
    )


def _key(part: str, given: Any) -> str:
    return f"data.num_images.{part}" if isinstance(given, dict) else "data.num_images"


def _declared(given: Any, part: str) -> tuple[int | None, str]:
    """(the images `data.num_images` declares for `part` (train: data.root, val: data.val_root), or
    None; what is wrong with the value, if anything)."""
    if given is None:
        return None, ""
    parts = given if isinstance(given, dict) else {"train": given}
    if set(parts) - {"train", "val"} or not all(_count_like(v) for v in parts.values()):
        return None, f"data.num_images={given!r} is not {_NUM_IMAGES_FORM} (positive counts)"
    return parts.get(part), ""


def _count_like(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _count(name: str, root: str, split: str, num_samples: int) -> int | None:
    try:
        if name == "synthetic":
            return num_samples
        if name == "fashion_mnist":
            return _FASHION_MNIST_SIZES["test" if split in ("val", "test") else "train"]
        if name == "webdataset":
            from dino.data.shards import read_index

            return int(read_index(root)["num_samples"])
        if name == "imagefolder" and root and storage.isdir(root):
            from dino.data.datasets import IMAGE_EXTENSIONS

            return sum(
                1 for f in storage.find(root) if f.count("/") == 1 and f.lower().endswith(IMAGE_EXTENSIONS)
            )
    except Exception:  # noqa: BLE001 - unreadable here: the estimate says "unknown"
        return None
    return None


def _pretrain_images(cfg: DinoConfig, world: int) -> _Size:
    """Images the run's pretraining processes, counted as the train loop counts its steps."""
    size = _dataset_size(cfg.data, "train")
    if size.images is None:
        return size
    spe = size.images // (cfg.optim.batch_size * world)
    total = cfg.optim.epochs * spe
    steps = min(total, cfg.train.max_steps or total)
    return dataclasses.replace(size, images=steps * cfg.optim.batch_size * world)


def _eval_size(data: Any, split: str) -> _Size:
    """A split as dino/eval/features.py `eval_dataset` reads it: data.limit cuts the train split of
    fashion_mnist and both splits of synthetic data (one generator), never an image folder's."""
    if data.name == "synthetic":
        return _Size(min(data.num_samples, data.limit or data.num_samples))
    if data.name == "fashion_mnist":
        return _dataset_size(data, split)
    return _dataset_size(dataclasses.replace(data, limit=0), split)


def _eval_images(protocol: str, ecfg: Any) -> _Size:
    train, test = _eval_size(ecfg.data, "train"), _eval_size(ecfg.data, "test")
    notes = train.notes + tuple(n for n in test.notes if n not in train.notes)
    if train.images is None or test.images is None:
        return _Size(None, train.why or test.why, notes)
    if protocol == "knn":
        images = min(train.images, ecfg.knn.max_train or train.images) + min(
            test.images, ecfg.knn.max_test or test.images
        )
        return _Size(images, notes=notes)
    lin = ecfg.linear
    epochs = min(lin.epochs, lin.max_epochs or lin.epochs)
    images = min(test.images, lin.max_test or test.images) + epochs * min(
        train.images, lin.max_train or train.images
    )
    return _Size(images, notes=notes)


# --------------------------------------------------------------------------------------------------
# Output and the budget
# --------------------------------------------------------------------------------------------------


def _hours_text(hours: float | None) -> str:
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
            Text(r.run.name), gpu_hours_text(r.gpu_hours), _hours_text(r.hours), memory, rate, r.source
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
        f"cost: {total} GPU-hours ({stages}); wall-clock {_hours_text(cost.wall_hours)} with array_parallelism "
        f"{sweep.array_parallelism}, {_devices(sweep, 'pretrain')} {unit} per pretraining job"
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
