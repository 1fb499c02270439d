"""What a sweep will cost before it is queued: GPU-hours, wall-clock and peak memory per GPU.

Each stage of each run processes a known number of images (pretraining: epochs x the dataset, as
the train loop counts steps; k-NN: bank + queries once; linear: the test split once plus the train
split every epoch, forward only). Its GPU-hours are images / (img/s per GPU) / 3600, its wall time
that over the stage's GPUs (nodes x gpus_per_node). The img/s per GPU comes from, in this order of
trust:

1. measured: finished, running or preempted runs in the sweep's MLflow store (any experiment) with the same
   throughput-shaping keys (SHAPE_KEYS) on the same card: their logged `avg_img_per_s`;
2. calibrated: a `dinolab bench --save` record of that shape on that card (`<root>/bench.json`);
3. estimated: FLOPs per image, counted by torch's FLOP counter on the meta device (no compute, no
   GPU), at an assumed model FLOP utilisation of the card: a guess, and labelled as one.

A plan of 1,000 runs must stay fast, so nothing here is done per run that can be done per shape: one
MLflow query per sweep, one FLOP count per model shape (cached on disk across commands), one dataset
size per data root. Evaluations are always estimated (nothing measures their speed yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino import cards, mlflow_store, storage
from dino.config import DataConfig, DinoConfig
from launcher.errors import UserError
from launcher.sweep import RunSpec, Sweep

MEASURED, CALIBRATED, ESTIMATED, UNKNOWN = "measured", "calibrated", "estimated", "unknown"

# What sets a training step's img/s per GPU (and its memory), besides the card: a run whose values
# of these keys match has the speed we will get. Data and schedule keys change the number of
# images, not the rate.
SHAPE_KEYS = (
    "model.name", "model.patch_size", "crops.global_size", "crops.local_size", "crops.num_local",
    "head.out_dim", "head.hidden_dim", "head.bottleneck_dim", "head.num_layers",
    "optim.batch_size", "train.precision", "train.compile",
)  # fmt: skip
# The subset that sets FLOPs per image (batch, precision and compile change the rate, not the work).
FLOP_KEYS = SHAPE_KEYS[:9]

# Model FLOP utilisation assumed for a FLOP estimate, from the reference step measured on an H200
# (docs: /work/shared ANCHORS): 124 GFLOP/image at 906 img/s = 11 % of 989 TFLOP/s, compiled 1224
# img/s = 15 %. Small models do worse; the label says it is a guess.
ASSUMED_MFU = 0.11
ASSUMED_MFU_COMPILED = 0.15
# A GPU the sweep file does not name (resources.<stage>.constraint/partition/additional): assume
# the commonest data-centre card we know rather than refuse to estimate; the detail says so.
DEFAULT_CARD = "A100"
UNKNOWN_GPU = "gpu"
# CPU runs (tests, the quickstart): effective FLOP/s per thread of the tiny ViT's training step on
# the project's 2-core machine (dinolab bench: 12.8 GFLOP/s, vit_test, fp32, 1 thread). A rough guess.
CPU_FLOPS_PER_THREAD = 12e9
# Peak memory: the step's weights, gradients and AdamW state plus the activations autograd saves.
# The activations counted on the meta device are fp32 with explicit attention; the reference step's
# measured peak (9.9 GiB for ViT-S/16, batch 64, bf16, fused attention) is 0.43 of that count.
ACTIVATION_FACTOR = {"bf16": 0.43, "fp16": 0.43, "fp32": 0.86}
BYTES_PER_PARAM = 4 * 4 + 4  # student fp32 weights, gradients, AdamW's two moments; teacher weights
CPU_BASE_GIB = 0.7  # a CPU run's peak is its process's resident set: Python, torch and the loader
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
BENCH_FILE = "bench.json"


class BudgetExceeded(UserError):
    """A submission whose estimate is over `--max-gpu-hours` or the sweep's `budget:`."""


@dataclass
class Speed:
    """img/s per GPU and peak memory per GPU of one stage shape, and where they come from."""

    img_per_s: float | None
    memory_gib: float | None
    source: str
    detail: str


@dataclass
class StageCost:
    stage: str
    images: int | None  # None: the dataset's size is unknown here
    devices: int
    speed: Speed
    fraction: float = 1.0  # of the whole stage: a resumed run's pretraining has only the rest to do

    @property
    def gpu_hours(self) -> float | None:
        if self.images is None or not self.speed.img_per_s:
            return None
        return self.images / self.speed.img_per_s / 3600

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
    def pretrain_gpu_hours(self) -> float | None:
        pre = self.stage("pretrain")
        return pre.gpu_hours if pre else 0.0

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

    def sources(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.source] = counts.get(r.source, 0) + 1
        return counts

    def most_expensive(self, n: int = 3) -> list[RunCost]:
        return sorted(self.runs, key=lambda r: -(r.gpu_hours or 0.0))[:n]


# --------------------------------------------------------------------------------------------------
# Shapes and cards
# --------------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _param(value: Any) -> str:
    """A config value as MLflow holds it: `log_params` stores str() of the value (True, not true)."""
    return str(value)


def shape_of(cfg: DinoConfig, card: str) -> tuple[str, ...]:
    return (*(_param(_get(cfg, k)) for k in SHAPE_KEYS), card)


def shape_label(shape: tuple[str, ...]) -> str:
    values = dict(zip((*SHAPE_KEYS, "card"), shape, strict=True))
    return (
        f"{values['model.name']}/{values['model.patch_size']} 2x{values['crops.global_size']}+"
        f"{values['crops.num_local']}x{values['crops.local_size']} K={values['head.out_dim']} "
        f"batch {values['optim.batch_size']} {values['train.precision']}"
        f"{' compiled' if values['train.compile'] == 'True' else ''} on {values['card']}"
    )


def devices(sweep: Sweep, stage: str) -> int:
    """GPUs of one job of the stage (nodes x gpus_per_node); CPU jobs count their processes."""
    res = sweep.stage_resources(stage)
    per_node = res.gpus_per_node or max(res.tasks_per_node, 1)
    return max(res.nodes, 1) * per_node


def stage_card(sweep: Sweep, stage: str, device: str) -> str:
    """The card a stage's jobs run on: cpu when the config or the resources ask for no GPU, else a
    card named in the SLURM constraint, partition or extra parameters (e.g. `constraint: h100`,
    `additional: {gres: "gpu:a100:8"}`), else UNKNOWN_GPU."""
    res = sweep.stage_resources(stage)
    if device == "cpu" or not res.gpus_per_node:
        return cards.CPU
    return (
        cards.find_card(" ".join([res.constraint, res.partition, json.dumps(res.additional)])) or UNKNOWN_GPU
    )


def _card_matches(wanted: str, have: str) -> bool:
    return wanted == have or (wanted == UNKNOWN_GPU and have not in ("", cards.CPU))


# --------------------------------------------------------------------------------------------------
# 1. measured: runs in the MLflow store
# --------------------------------------------------------------------------------------------------


def measured_runs(uri: str) -> tuple[list[tuple[tuple[str, ...], float, float | None, str]], str]:
    """(shape, img/s per GPU, peak memory GiB, experiment) of every finished, running or preempted run
    in the store that logged a throughput and its card, and a note when the store could not be read.
    One search over all experiments; a local store that does not exist is not created."""
    if not uri or mlflow_store.missing_store(uri):
        return [], ""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
        found, token = [], None
        while experiments:
            page = client.search_runs(
                list(experiments), max_results=5000,
                filter_string="tags.`dinolab.kind` = 'run' and metrics.avg_img_per_s > 0",
                page_token=token,
            )  # fmt: skip
            for run in page:
                rate, card = run.data.metrics.get("avg_img_per_s"), run.data.tags.get("dinolab.card", "")
                # A preempted run (KILLED, to be requeued) measured its speed as well as a finished one.
                if run.info.status not in ("FINISHED", "RUNNING", "KILLED") or not rate or not card:
                    continue
                params = run.data.params
                if any(k not in params for k in SHAPE_KEYS):
                    continue
                shape = (*(params[k] for k in SHAPE_KEYS), card)
                found.append(
                    (shape, rate, run.data.metrics.get("memory_gib"), experiments[run.info.experiment_id])
                )
            token = page.token
            if not token:
                break
        return found, ""
    except Exception as err:  # noqa: BLE001 - a plan still works without the store; it says so
        return (
            [],
            f"MLflow store {uri} not read ({str(err).strip().splitlines()[0][:200]}): no measured figures",
        )


def _measured(shape: tuple[str, ...], runs: list) -> Speed | None:
    hits = [r for r in runs if r[0][:-1] == shape[:-1] and _card_matches(shape[-1], r[0][-1])]
    if not hits:
        return None
    rate = statistics.median(r[1] for r in hits)
    memory = [r[2] for r in hits if r[2] is not None]
    where = sorted({r[3] for r in hits})
    detail = f"median of {len(hits)} run(s) in {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}"
    if shape[-1] == UNKNOWN_GPU:
        detail += f" on {', '.join(sorted({r[0][-1] for r in hits}))}"
    return Speed(rate, max(memory) if memory else None, MEASURED, detail)


# --------------------------------------------------------------------------------------------------
# 2. calibrated: `dinolab bench --save` records
# --------------------------------------------------------------------------------------------------


def bench_path(sweep: Sweep) -> str:
    """The sweep's bench store: beside its default SQLite store, in the sweep's (local) root."""
    return os.path.join(sweep.local_root, BENCH_FILE)


def bench_key(shape: tuple[str, ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in zip((*SHAPE_KEYS, "card"), shape, strict=True))


def read_bench(path: str) -> dict[str, dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    try:
        return json.loads(Path(path).read_text()).get("records", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def save_bench(path: str, cfg: DinoConfig, result: Any) -> str:
    """Keep a bench result as the calibration of its shape on its card; `path` is the file or a
    folder (then `<folder>/bench.json`, e.g. a sweep's root). Returns the file written."""
    if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, BENCH_FILE)
    rate = result.end_to_end_img_per_s or result.synthetic_img_per_s  # what a run gets, when known
    shape = shape_of(cfg, cards.card_name(result.device))
    records = read_bench(path)
    records[bench_key(shape)] = {
        "img_per_s": rate, "memory_gib": result.peak_memory_gib, "device": result.device,
        "input": "end to end" if result.end_to_end_img_per_s else "synthetic", "time": time.time(),
        "flops_per_image": result.flops_per_step / max(result.batch_size, 1),
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    storage.atomic_write_text(path, json.dumps({"records": records}, indent=1, sort_keys=True))
    return path


def _calibrated(shape: tuple[str, ...], bench: dict[str, dict[str, Any]]) -> Speed | None:
    for key in [bench_key(shape)] if shape[-1] != UNKNOWN_GPU else list(bench):
        rec = bench.get(key)
        if rec is None:
            continue
        if shape[-1] == UNKNOWN_GPU:  # any GPU record of this shape
            rec_card = key.rsplit("card=", 1)[-1]
            if key.rsplit(",card=", 1)[0] != bench_key(shape).rsplit(",card=", 1)[0] or rec_card == cards.CPU:
                continue
        day = time.strftime("%Y-%m-%d", time.gmtime(rec.get("time", 0)))
        return Speed(rec["img_per_s"], rec.get("memory_gib"), CALIBRATED,
                     f"dinolab bench {day} on {rec.get('device', '?')}, {rec.get('input', '')} input")  # fmt: skip
    return None


# --------------------------------------------------------------------------------------------------
# 3. estimated: FLOPs per image at an assumed utilisation
# --------------------------------------------------------------------------------------------------


def _cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "dinolab", "flops.json")


_FLOPS: dict[str, dict[str, float]] = {}


def _cached(key: str, compute) -> dict[str, float]:
    """FLOP counts by model shape, in this process and in ~/.cache/dinolab/flops.json (counting
    takes 1-3 s a shape on the meta device; the result never changes for a torch version)."""
    from importlib.metadata import version  # not `import torch`: seconds a plan need not spend

    key = f"{key},torch={version('torch')}"
    if key not in _FLOPS:
        path = _cache_path()
        with contextlib.suppress(OSError, json.JSONDecodeError):
            _FLOPS.update(json.loads(Path(path).read_text()))
        if key not in _FLOPS:
            _FLOPS[key] = compute()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                storage.atomic_write_text(path, json.dumps(_FLOPS, indent=1, sort_keys=True))
            except OSError:
                pass  # a read-only home: the count is kept for this process only
    return _FLOPS[key]


def train_flops(cfg: DinoConfig) -> dict[str, float]:
    """{flops, activation_bytes} per image of one training step and {params} of the student: the
    teacher's forward on the 2 global crops, the student's forward and backward on every crop,
    counted on the meta device at batch 1 (FLOPs and saved activations grow linearly with it)."""

    def count() -> dict[str, float]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from dino.models import build_student_teacher

        with torch.device("meta"):
            student, teacher = build_student_teacher(cfg.model, cfg.head, cfg.crops.global_size)
        g, loc = cfg.crops.global_size, cfg.crops.local_size
        crops = [torch.empty(1, 3, g, g, device="meta") for _ in range(2)]
        crops += [torch.empty(1, 3, loc, loc, device="meta") for _ in range(cfg.crops.num_local)]
        saved = [0]

        def pack(t):
            base = t._base if t._base is not None else t
            if not (base.is_leaf and base.requires_grad):  # weights saved for backward are not activations
                saved[0] += t.numel() * t.element_size()
            return t

        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                teacher(crops[:2])
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = student(crops)
            out.float().sum().backward()
        params = sum(p.numel() for p in student.parameters())
        return {
            "flops": float(counter.get_total_flops()),
            "activation_bytes": float(saved[0]),
            "params": float(params),
        }

    return _cached("train," + ",".join(_param(_get(cfg, k)) for k in FLOP_KEYS), count)


def forward_flops(cfg: DinoConfig, image_size: int) -> float:
    """FLOPs per image of the teacher backbone's forward at `image_size` (feature extraction)."""

    def count() -> dict[str, float]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from dino.models import build_backbone

        with torch.device("meta"):
            backbone = build_backbone(cfg.model.name, cfg.model.patch_size, image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone(torch.empty(1, 3, image_size, image_size, device="meta"))
        return {"flops": float(counter.get_total_flops())}

    key = f"forward,{cfg.model.name},{cfg.model.patch_size},{image_size}"
    return _cached(key, count)["flops"]


def _rate(card: str, precision: str, compiled: bool, threads: int) -> tuple[float, str]:
    """(FLOP/s assumed achievable, how it was assumed)."""
    if card == cards.CPU:
        rate = CPU_FLOPS_PER_THREAD * max(threads, 1)
        return rate, f"{rate / 1e9:.0f} GFLOP/s assumed on {threads} CPU thread(s)"
    name = card if card in cards.PEAK_BF16 else DEFAULT_CARD
    peak = cards.PEAK_BF16[name] / (2 if precision == "fp32" else 1)  # fp32 runs on TF32 units: half
    mfu = ASSUMED_MFU_COMPILED if compiled else ASSUMED_MFU
    assumed = "" if card == name else f"card not named in resources: assumed {name}; "
    return peak * mfu, f"{assumed}{100 * mfu:.0f} % of {name}'s {peak / 1e12:.0f} TFLOP/s assumed"


def _estimated(cfg: DinoConfig, card: str, threads: int) -> Speed:
    counted = train_flops(cfg)
    rate, how = _rate(card, cfg.train.precision, cfg.train.compile, threads)
    per_image = counted["flops"]
    factor = ACTIVATION_FACTOR.get(cfg.train.precision, 0.86)
    memory = (
        counted["params"] * BYTES_PER_PARAM + counted["activation_bytes"] * cfg.optim.batch_size * factor
    ) / 2**30
    if card == cards.CPU:
        memory += CPU_BASE_GIB
    return Speed(rate / per_image, memory, ESTIMATED, f"guess: {per_image / 1e9:.3g} GFLOP/image, {how}")


# --------------------------------------------------------------------------------------------------
# Images per stage
# --------------------------------------------------------------------------------------------------

_SIZES: dict[tuple, int | None] = {}


def dataset_size(data: DataConfig, split: str) -> int | None:
    """Images of a split, read once per data root (None when the data is not readable here)."""
    root = data.root if split == "train" else getattr(data, "val_root", "") or data.root
    key = (data.name, root, split, data.num_samples)
    if key not in _SIZES:
        _SIZES[key] = _count(data.name, root, split, data.num_samples)
    size = _SIZES[key]
    if size is not None and split == "train" and data.limit:
        size = min(size, data.limit)
    return size


def _count(name: str, root: str, split: str, num_samples: int) -> int | None:
    try:
        if name == "synthetic":
            return num_samples
        if name == "fashion_mnist":
            return FASHION_MNIST_SIZES["test" if split in ("val", "test") else "train"]
        if name == "webdataset":
            from dino.shards import read_index

            return int(read_index(root)["num_samples"])
        if name == "imagefolder" and storage.isdir(root):
            from dino.data import IMAGE_EXTENSIONS

            return sum(
                1 for f in storage.find(root) if f.count("/") == 1 and f.lower().endswith(IMAGE_EXTENSIONS)
            )
    except Exception:  # noqa: BLE001 - unreadable here: the estimate says "unknown"
        return None
    return None


def pretrain_images(cfg: DinoConfig, world: int) -> int | None:
    """Images the run's pretraining processes, counted as the train loop counts its steps."""
    n = dataset_size(cfg.data, "train")
    if n is None:
        return None
    spe = n // (cfg.optim.batch_size * world)
    total = cfg.optim.epochs * spe
    steps = min(total, cfg.train.max_steps or total)
    return steps * cfg.optim.batch_size * world


def _eval_size(data: Any, split: str) -> int | None:
    """A split as dino/eval/features.py `eval_dataset` reads it: data.limit cuts the train split of
    fashion_mnist and both splits of synthetic data (one generator), never an image folder's."""
    if data.name == "synthetic":
        return min(data.num_samples, data.limit or data.num_samples)
    if data.name == "fashion_mnist":
        return dataset_size(data, split)
    return dataset_size(dataclasses.replace(data, limit=0), split)


def eval_images(protocol: str, ecfg: Any) -> int | None:
    train, test = _eval_size(ecfg.data, "train"), _eval_size(ecfg.data, "test")
    if train is None or test is None:
        return None
    if protocol == "knn":
        return min(train, ecfg.knn.max_train or train) + min(test, ecfg.knn.max_test or test)
    lin = ecfg.linear
    epochs = min(lin.epochs, lin.max_epochs or lin.epochs)
    return min(test, lin.max_test or test) + epochs * min(train, lin.max_train or train)


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


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
    for run in runs:
        fraction, evals = (work or {}).get(run.run_id, (1.0, list(sweep.evals)))
        stages = []
        if fraction > 0:
            card = stage_card(sweep, "pretrain", run.config.train.device)
            shape = shape_of(run.config, card)
            if shape not in speeds:
                speeds[shape] = (_measured(shape, measured) or _calibrated(shape, bench)
                                 or _estimated(run.config, card, threads))  # fmt: skip
            images = pretrain_images(run.config, world)
            if images is not None:
                images = round(images * fraction)
            stages.append(StageCost("pretrain", images, world, speeds[shape], fraction))
        for protocol in evals:
            images, speed = _eval_cost(sweep, run, protocol, eval_speeds)
            stages.append(StageCost(protocol, images, devices(sweep, protocol), speed))
        out.append(RunCost(run, stages))
    notes = [note] if note else []
    return SweepCost(out, _wall_hours(sweep, out), notes)


def _eval_cost(sweep: Sweep, run: RunSpec, protocol: str, cache: dict) -> tuple[int | None, Speed]:
    """Images and forward speed of one evaluation, once per (protocol, data, model) of the sweep."""
    from dino.eval.config import _plain, compose_eval

    cfg = run.config
    data = _plain(cfg.data)
    key = (protocol, json.dumps(data, sort_keys=True), cfg.model.name, cfg.model.patch_size, cfg.crops.global_size,
           cfg.train.device, cfg.train.precision)  # fmt: skip
    if key not in cache:
        try:
            # The run folder does not matter to the cost; compose_eval only insists one is named.
            ecfg = compose_eval([*sweep.eval_overrides.get(protocol, []), "run.dir=PLACEHOLDER"], data)
        except Exception as err:  # noqa: BLE001 - the evaluation job reports it; the plan goes on
            cache[key] = (None, Speed(None, None, UNKNOWN, f"evaluation config: {err}"))
            return cache[key]
        size = ecfg.image_size or cfg.crops.global_size
        card = stage_card(
            sweep, protocol, "cpu" if ecfg.device == "cpu" or cfg.train.device == "cpu" else "auto"
        )
        rate, how = _rate(card, cfg.train.precision, False, sweep.stage_resources(protocol).cpus_per_task)
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
        return f"{r.run.name} {stage.stage}: the dataset is not readable here, so its size is unknown"
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
