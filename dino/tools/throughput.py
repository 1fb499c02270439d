"""`dinolab bench`: the speed of a config's training step, on synthetic crops and through the real loader.

For any config: N warm-up and M timed steps of the real `train_step` on crops generated on the
device (the model alone), the same through the configured data pipeline (end to end), and the loader
alone. Reports images/s per device, step time, FLOPs per step counted by torch's FLOP counter,
TFLOP/s, model FLOP utilisation against the card's dense bf16 peak (when the card is known), peak
memory and, with `train.compile=true`, the compile time (the warm-up's extra cost).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from dino.config.schema import DinoConfig
from dino.data.train_data import TrainData
from dino.io import distributed
from dino.method.step import StepState, train_step
from dino.run.accelerators import PEAK_BF16
from dino.run.build import build_run
from dino.run.train_metrics import memory_gib


@dataclass
class BenchResult:
    device: str
    config: str
    batch_size: int
    warmup: int
    steps: int
    synthetic_img_per_s: float = 0.0
    synthetic_step_ms: float = 0.0
    loader_img_per_s: float = 0.0  # the data pipeline alone
    end_to_end_img_per_s: float = 0.0
    end_to_end_fraction: float = 0.0  # end to end / synthetic
    flops_per_step: float = 0.0
    tflops: float = 0.0
    peak_tflops: float | None = None
    mfu: float | None = None
    peak_memory_gib: float = 0.0
    warmup_s: float = 0.0
    compile: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_crops(cfg: DinoConfig, device: torch.device) -> list[torch.Tensor]:
    b, g, loc = cfg.optim.batch_size, cfg.crops.global_size, cfg.crops.local_size
    crops = [torch.randn(b, 3, g, g, device=device) for _ in range(2)]
    return crops + [torch.randn(b, 3, loc, loc, device=device) for _ in range(cfg.crops.num_local)]


def count_flops(state: StepState, crops: list[torch.Tensor]) -> float:
    """FLOPs of one full step (teacher forward, student forward and backward), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(state, crops, 0)
    return float(counter.get_total_flops())


def _timed(run_step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(warm-up seconds, seconds per timed step)."""
    start = time.perf_counter()
    for i in range(warmup):
        run_step(i)
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        run_step(i)
    _sync(device)
    return warm, (time.perf_counter() - start) / steps


def run(cfg: DinoConfig, warmup: int = 5, steps: int = 20, inputs: str = "both") -> BenchResult:
    """Benchmark `cfg` in this process (one device); `inputs`: synthetic, loader or both."""
    device = distributed.setup(cfg.train.device).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = BenchResult(name, f"{cfg.model.name}/{cfg.model.patch_size} 2x{cfg.crops.global_size}+"
                         f"{cfg.crops.num_local}x{cfg.crops.local_size} K={cfg.head.out_dim} {cfg.train.precision}",
                         cfg.optim.batch_size, warmup, steps, compile=cfg.train.compile)  # fmt: skip
    state = build_run(cfg, device, steps_per_epoch=max(warmup + steps, 1)).step_state
    batch = cfg.optim.batch_size
    total = warmup + steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if inputs in ("synthetic", "both"):
        crops = _synthetic_crops(cfg, device)
        warm, per_step = _timed(lambda i: train_step(state, crops, i % total), warmup, steps, device)
        result.synthetic_step_ms = per_step * 1e3
        result.synthetic_img_per_s = batch / per_step
        result.warmup_s = warm
        result.flops_per_step = count_flops(state, crops)
        result.tflops = result.flops_per_step / per_step / 1e12
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak is not None:
            result.peak_tflops = peak / 1e12
            result.mfu = result.tflops * 1e12 / peak
        elif device.type == "cuda":
            result.notes.append(f"no bf16 peak known for {name}: MFU not computed")

    if inputs in ("loader", "both"):
        data = TrainData.open(cfg, device, world_size=1)
        result.notes.append("augmentation " + ("batched on the device; the loader only decodes" if data.batch_augment
                                               else "per image in the loader workers"))  # fmt: skip
        spe = data.steps_per_epoch
        if spe == 0:
            raise ValueError(f"the dataset has {len(data.dataset)} images, fewer than one batch of {batch}")
        epochs_needed = total // spe + 1
        end = spe * epochs_needed

        it = iter(data.loader(0, end))
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        result.loader_img_per_s = batch * steps / (time.perf_counter() - start)
        del it

        batches = data.batches(0, end)

        def real_step(i: int) -> None:
            train_step(state, next(batches), i % total)

        _, per_step = _timed(real_step, warmup, steps, device)
        result.end_to_end_img_per_s = batch / per_step
        if result.synthetic_img_per_s:
            result.end_to_end_fraction = result.end_to_end_img_per_s / result.synthetic_img_per_s
        del batches
    result.peak_memory_gib = memory_gib(device)
    return result


def table_rows(result: BenchResult) -> list[tuple[str, str]]:
    r = result
    rows = [("device", r.device), ("config", r.config), ("batch per device", str(r.batch_size)),
            ("warm-up / timed steps", f"{r.warmup} / {r.steps}")]  # fmt: skip
    if r.synthetic_img_per_s:
        rows += [
            ("synthetic input", f"{r.synthetic_img_per_s:,.1f} img/s ({r.synthetic_step_ms:.1f} ms/step)"),
            ("FLOPs per step", f"{r.flops_per_step / 1e9:,.1f} GFLOP"),
            ("achieved", f"{r.tflops:,.2f} TFLOP/s"
             + (f" = {100 * r.mfu:.1f} % of {r.peak_tflops:,.0f} TFLOP/s bf16 peak" if r.mfu is not None else "")),
            (("compile + warm-up" if r.compile else "warm-up"), f"{r.warmup_s:.1f} s"),
        ]  # fmt: skip
    if r.loader_img_per_s:
        rows += [("loader alone", f"{r.loader_img_per_s:,.1f} img/s"),
                 ("end to end", f"{r.end_to_end_img_per_s:,.1f} img/s"
                  + (f" ({100 * r.end_to_end_fraction:.0f} % of synthetic)" if r.end_to_end_fraction else ""))]  # fmt: skip
    rows.append(("peak memory", f"{r.peak_memory_gib:.2f} GiB"))
    rows += [("note", n) for n in r.notes]
    return rows
