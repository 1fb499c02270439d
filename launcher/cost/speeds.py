"""Estimated speed, the least trusted: FLOPs per image, counted by torch's FLOP counter on the meta
device (no compute, no GPU), at an assumed model FLOP utilisation of the card: a guess, and labelled
as one. One count per model shape, cached on disk across commands (~/.cache/dinolab/flops.json)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from dino.config.schema import DinoConfig
from dino.io import storage
from dino.run import cards
from launcher.cost.model import ESTIMATED, Speed
from launcher.cost.shapes import FLOP_KEYS, get_key, param_text

# Model FLOP utilisation assumed for a FLOP estimate, from the reference step measured on an H200
# (docs: /work/shared ANCHORS): 124 GFLOP/image at 906 img/s = 11 % of 989 TFLOP/s, compiled 1224
# img/s = 15 %. Small models do worse; the label says it is a guess.
ASSUMED_MFU = 0.11
ASSUMED_MFU_COMPILED = 0.15
# A GPU the sweep file does not name (resources.<stage>.constraint/partition/additional): assume
# the commonest data-centre card we know rather than refuse to estimate; the detail says so.
DEFAULT_CARD = "A100"
# CPU runs (tests, the quickstart): effective FLOP/s per thread of the tiny ViT's training step on
# the project's 2-core machine (dinolab bench: 12.8 GFLOP/s, vit_test, fp32, 1 thread). A rough guess.
CPU_FLOPS_PER_THREAD = 12e9
# Peak memory: the step's weights, gradients and AdamW state plus the activations autograd saves.
# The activations counted on the meta device are fp32 with explicit attention; the reference step's
# measured peak (9.9 GiB for ViT-S/16, batch 64, bf16, fused attention) is 0.43 of that count.
ACTIVATION_FACTOR = {"bf16": 0.43, "fp16": 0.43, "fp32": 0.86}
BYTES_PER_PARAM = 4 * 4 + 4  # student fp32 weights, gradients, AdamW's two moments; teacher weights
CPU_BASE_GIB = 0.7  # a CPU run's peak is its process's resident set: Python, torch and the loader


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

    return _cached("train," + ",".join(param_text(get_key(cfg, k)) for k in FLOP_KEYS), count)


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
    if card == cards.CPU:
        rate = CPU_FLOPS_PER_THREAD * max(threads, 1)
        return rate, f"{rate / 1e9:.0f} GFLOP/s assumed on {threads} CPU thread(s)"
    name = card if card in cards.PEAK_BF16 else DEFAULT_CARD
    peak = cards.PEAK_BF16[name] / (2 if precision == "fp32" else 1)  # fp32 runs on TF32 units: half
    mfu = ASSUMED_MFU_COMPILED if compiled else ASSUMED_MFU
    assumed = "" if card == name else f"card not named in resources: assumed {name}; "
    return peak * mfu, f"{assumed}{100 * mfu:.0f} % of {name}'s {peak / 1e12:.0f} TFLOP/s assumed"


def estimated_speed(cfg: DinoConfig, card: str, threads: int) -> Speed:
    counted = train_flops(cfg)
    rate, how = flop_rate(card, cfg.train.precision, cfg.train.compile, threads)
    per_image = counted["flops"]
    factor = ACTIVATION_FACTOR.get(cfg.train.precision, 0.86)
    memory = (
        counted["params"] * BYTES_PER_PARAM + counted["activation_bytes"] * cfg.optim.batch_size * factor
    ) / 2**30
    if card == cards.CPU:
        memory += CPU_BASE_GIB
    return Speed(rate / per_image, memory, ESTIMATED, f"guess: {per_image / 1e9:.3g} GFLOP/image, {how}")
