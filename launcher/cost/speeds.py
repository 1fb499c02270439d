"""Where a speed comes from: the img/s and peak memory per GPU of a run's shape on its card, which
launcher/cost/sweep_cost.py turns into GPU-hours. Three sources, in order of trust:

1. measured: finished, running or preempted runs in the sweep's MLflow store (any experiment) with the
   same shape on the same card, and their logged `avg_img_per_s`, with `job_fixed_s`: what each job
   pays once beyond that rate (its first window's warm-up, the k-NN monitor), which the estimate adds
   per job start. One search per sweep; the store is opened through dino/io/mlflow_store.py and never
   created.
2. calibrated: a `dinolab bench --save` record of that shape on that card (`<root>/bench.json`,
   `save_bench`).
3. estimated, the least trusted: FLOPs per image, counted by torch's FLOP counter on the meta device
   (no compute, no GPU), at an assumed model FLOP utilisation of the card: a guess, and labelled as
   one. One count per model shape, cached on disk across commands (~/.cache/dinolab/flops.json).

A run's shape is what sets a training step's speed: the values of its config's throughput-shaping keys
(`_SHAPE_KEYS`) and its card (`shape_of`). `Speed`, its sources and the shape live here rather than
beside the cost records so that this module imports nothing of launcher/cost/sweep_cost.py, which
imports it. Imports nothing heavy: MLflow and torch are imported when a figure is asked for.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino.config.schema import DinoConfig
from dino.io import mlflow_store, storage
from dino.run import accelerators
from launcher.sweep_file import Sweep

# --------------------------------------------------------------------------------------------------
# A speed, its source and the shape it is the speed of
# --------------------------------------------------------------------------------------------------


# Where a speed comes from, in order of trust (`estimate` tries them in this order); unknown: no figure.
MEASURED, CALIBRATED, ESTIMATED, UNKNOWN = "measured", "calibrated", "estimated", "unknown"


@dataclass
class Speed:
    """img/s per GPU and peak memory per GPU of one stage shape, and where they come from."""

    img_per_s: float | None
    memory_gib: float | None
    source: str
    detail: str
    # Seconds a job of this shape pays once beyond `img_per_s` (measured only; else none counted).
    fixed_s: float = 0.0


# What sets a training step's img/s per GPU (and its memory), besides the card: a run whose values
# of these keys match has the speed we will get. Data and schedule keys change the number of
# images, not the rate.
_SHAPE_KEYS = (
    "model.name", "model.patch_size", "crops.global_size", "crops.local_size", "crops.num_local",
    "head.out_dim", "head.hidden_dim", "head.bottleneck_dim", "head.num_layers",
    "optim.batch_size", "train.precision", "train.compile",
)  # fmt: skip
# The subset that sets FLOPs per image (batch, precision and compile change the rate, not the work).
_FLOP_KEYS = _SHAPE_KEYS[:9]
# A GPU the sweep file does not name (resources.<stage>.constraint/partition/additional): the
# measured and calibrated figures of any GPU count; a FLOP estimate assumes _DEFAULT_CARD (below).
UNKNOWN_GPU = "gpu"


def _get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _param_text(value: Any) -> str:
    """A config value as MLflow holds it: `log_params` stores str() of the value (True, not true)."""
    return str(value)


# Every shape key's value in one call: `shape_of` is asked for each run of a 10,000-run search.
_SHAPE_VALUES = operator.attrgetter(*_SHAPE_KEYS)


def shape_of(cfg: DinoConfig, card: str) -> tuple[str, ...]:
    return (*map(_param_text, _SHAPE_VALUES(cfg)), card)


def _card_matches(wanted: str, have: str) -> bool:
    return wanted == have or (wanted == UNKNOWN_GPU and have not in ("", accelerators.CPU))


# --------------------------------------------------------------------------------------------------
# Measured: runs of the same shape on the same card in MLflow
# --------------------------------------------------------------------------------------------------


# One measured run: (shape, img/s per GPU, peak memory GiB, experiment, its last job's fixed seconds).
MeasuredRun = tuple[tuple[str, ...], float, float | None, str, float | None]


def measured_runs(uri: str) -> tuple[list[MeasuredRun], str]:
    """A `MeasuredRun` of every finished, running or preempted run in the store that logged a
    throughput and its card, and a note when the store could not be read.
    One search over all experiments; a local store that does not exist is not created."""
    if not uri or mlflow_store.missing_store(uri):
        return [], ""
    try:
        client = mlflow_store.existing_client(uri)
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
                if any(k not in params for k in _SHAPE_KEYS):
                    continue
                shape = (*(params[k] for k in _SHAPE_KEYS), card)
                metrics = run.data.metrics
                found.append((shape, rate, metrics.get("memory_gib"), experiments[run.info.experiment_id],
                              metrics.get("job_fixed_s")))  # fmt: skip
            token = page.token
            if not token:
                break
        return found, ""
    except Exception as err:  # noqa: BLE001 - a plan still works without the store; it says so
        return (
            [],
            f"MLflow store {uri} not read ({str(err).strip().splitlines()[0][:200]}): no measured figures",
        )


def measured_speed(shape: tuple[str, ...], runs: list[MeasuredRun]) -> Speed | None:
    """The speed of `shape` as the store's runs of it measured. GPU-hours add up (images / rate +
    fixed seconds, job after job), so the figures are the ones that predict a sum: the harmonic mean
    of the rates (each run's images at its own rate) and the mean of the fixed seconds. A median
    would be robust to one odd run but under-prices a sweep whose runs were slowed unevenly (a busy
    node, a shared filesystem): the sum is what the budget is checked against."""
    hits = [r for r in runs if r[0][:-1] == shape[:-1] and _card_matches(shape[-1], r[0][-1])]
    if not hits:
        return None
    rate = statistics.harmonic_mean([r[1] for r in hits])
    memory = [r[2] for r in hits if r[2] is not None]
    where = sorted({r[3] for r in hits})
    detail = f"mean of {len(hits)} run(s) in {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}"
    if shape[-1] == UNKNOWN_GPU:
        detail += f" on {', '.join(sorted({r[0][-1] for r in hits}))}"
    # The latest value each run logged: its last job's (runs logged before the metric existed: none).
    fixed = [r[4] for r in hits if r[4] is not None]
    fixed_s = statistics.fmean(fixed) if fixed else 0.0
    if fixed:
        detail += f", + {fixed_s:.3g} s per job"
    return Speed(rate, max(memory) if memory else None, MEASURED, detail, fixed_s)


# --------------------------------------------------------------------------------------------------
# Calibrated: `dinolab bench --save` records (<root>/bench.json)
# --------------------------------------------------------------------------------------------------


_BENCH_FILE = "bench.json"


def bench_path(sweep: Sweep) -> str:
    """The sweep's bench store: beside its default SQLite store, in the sweep's (local) root."""
    return os.path.join(sweep.local_root, _BENCH_FILE)


def _bench_key(shape: tuple[str, ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in zip((*_SHAPE_KEYS, "card"), shape, strict=True))


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
        path = os.path.join(path, _BENCH_FILE)
    rate = result.end_to_end_img_per_s or result.synthetic_img_per_s  # what a run gets, when known
    shape = shape_of(cfg, accelerators.card_name(result.device))
    records = read_bench(path)
    records[_bench_key(shape)] = {
        "img_per_s": rate, "memory_gib": result.peak_memory_gib, "device": result.device,
        "input": "end to end" if result.end_to_end_img_per_s else "synthetic", "time": time.time(),
        "flops_per_image": result.flops_per_step / max(result.batch_size, 1),
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    storage.atomic_write_text(path, json.dumps({"records": records}, indent=1, sort_keys=True))
    return path


def calibrated_speed(shape: tuple[str, ...], bench: dict[str, dict[str, Any]]) -> Speed | None:
    for key in [_bench_key(shape)] if shape[-1] != UNKNOWN_GPU else list(bench):
        rec = bench.get(key)
        if rec is None:
            continue
        if shape[-1] == UNKNOWN_GPU:  # any GPU record of this shape
            rec_card = key.rsplit("card=", 1)[-1]
            if (
                key.rsplit(",card=", 1)[0] != _bench_key(shape).rsplit(",card=", 1)[0]
                or rec_card == accelerators.CPU
            ):
                continue
        day = time.strftime("%Y-%m-%d", time.gmtime(rec.get("time", 0)))
        return Speed(rec["img_per_s"], rec.get("memory_gib"), CALIBRATED,
                     f"dinolab bench {day} on {rec.get('device', '?')}, {rec.get('input', '')} input")  # fmt: skip
    return None


# --------------------------------------------------------------------------------------------------
# Estimated: FLOPs per image at an assumed model FLOP utilisation
# --------------------------------------------------------------------------------------------------


# Model FLOP utilisation assumed for a FLOP estimate, from the reference step measured on an H200
# (docs: /work/shared ANCHORS): 124 GFLOP/image at 906 img/s = 11 % of 989 TFLOP/s, compiled 1224
# img/s = 15 %. Small models do worse; the label says it is a guess.
_ASSUMED_MFU = 0.11
_ASSUMED_MFU_COMPILED = 0.15
# A GPU the sweep file does not name (resources.<stage>.constraint/partition/additional): assume
# the commonest data-centre card we know rather than refuse to estimate; the detail says so.
_DEFAULT_CARD = "A100"
# CPU runs (tests, the quickstart): effective FLOP/s per thread of the tiny ViT's training step on
# the project's 2-core machine (dinolab bench: 12.8 GFLOP/s, vit_test, fp32, 1 thread). A rough guess.
_CPU_FLOPS_PER_THREAD = 12e9
# Peak memory: the step's weights, gradients and AdamW state plus the activations autograd saves.
# The activations counted on the meta device are fp32 with explicit attention; the reference step's
# measured peak (9.9 GiB for ViT-S/16, batch 64, bf16, fused attention) is 0.43 of that count.
_ACTIVATION_FACTOR = {"bf16": 0.43, "fp16": 0.43, "fp32": 0.86}
_BYTES_PER_PARAM = 4 * 4 + 4  # student fp32 weights, gradients, AdamW's two moments; teacher weights
_CPU_BASE_GIB = 0.7  # a CPU run's peak is its process's resident set: Python, torch and the loader


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


def _train_flops(cfg: DinoConfig) -> dict[str, float]:
    """{flops, activation_bytes} per image of one training step and {params} of the student: the
    teacher's forward on the 2 global crops, the student's forward and backward on every crop,
    counted on the meta device at batch 1 (FLOPs and saved activations grow linearly with it)."""

    def count() -> dict[str, float]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from dino.method.models import build_student_teacher

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

    return _cached("train," + ",".join(_param_text(_get_key(cfg, k)) for k in _FLOP_KEYS), count)


def forward_flops(cfg: DinoConfig, image_size: int) -> float:
    """FLOPs per image of the teacher backbone's forward at `image_size` (feature extraction)."""

    def count() -> dict[str, float]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from dino.method.models import build_backbone

        with torch.device("meta"):
            backbone = build_backbone(cfg.model.name, cfg.model.patch_size, image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone(torch.empty(1, 3, image_size, image_size, device="meta"))
        return {"flops": float(counter.get_total_flops())}

    key = f"forward,{cfg.model.name},{cfg.model.patch_size},{image_size}"
    return _cached(key, count)["flops"]


def flop_rate(card: str, precision: str, compiled: bool, threads: int) -> tuple[float, str]:
    """(FLOP/s assumed achievable, how it was assumed)."""
    if card == accelerators.CPU:
        rate = _CPU_FLOPS_PER_THREAD * max(threads, 1)
        return rate, f"{rate / 1e9:.0f} GFLOP/s assumed on {threads} CPU thread(s)"
    name = card if card in accelerators.PEAK_BF16 else _DEFAULT_CARD
    peak = accelerators.PEAK_BF16[name] / (2 if precision == "fp32" else 1)  # fp32 runs on TF32 units: half
    mfu = _ASSUMED_MFU_COMPILED if compiled else _ASSUMED_MFU
    assumed = "" if card == name else f"card not named in resources: assumed {name}; "
    return peak * mfu, f"{assumed}{100 * mfu:.0f} % of {name}'s {peak / 1e12:.0f} TFLOP/s assumed"


def estimated_speed(cfg: DinoConfig, card: str, threads: int) -> Speed:
    counted = _train_flops(cfg)
    rate, how = flop_rate(card, cfg.train.precision, cfg.train.compile, threads)
    per_image = counted["flops"]
    factor = _ACTIVATION_FACTOR.get(cfg.train.precision, 0.86)
    memory = (
        counted["params"] * _BYTES_PER_PARAM + counted["activation_bytes"] * cfg.optim.batch_size * factor
    ) / 2**30
    if card == accelerators.CPU:
        memory += _CPU_BASE_GIB
    return Speed(rate / per_image, memory, ESTIMATED, f"guess: {per_image / 1e9:.3g} GFLOP/image, {how}")
