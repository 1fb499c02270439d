"""What sets a training step's speed: the run's shape (SHAPE_KEYS of its config) and its card, read
from the sweep's resources; the GPUs of one job of a stage."""

from __future__ import annotations

import json
from typing import Any

from dino.config.schema import DinoConfig
from dino.run import cards
from launcher.sweep import Sweep

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
# A GPU the sweep file does not name (resources.<stage>.constraint/partition/additional): the
# measured and calibrated figures of any GPU count; launcher/cost/flops.py assumes a DEFAULT_CARD.
UNKNOWN_GPU = "gpu"


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def param_text(value: Any) -> str:
    """A config value as MLflow holds it: `log_params` stores str() of the value (True, not true)."""
    return str(value)


def shape_of(cfg: DinoConfig, card: str) -> tuple[str, ...]:
    return (*(param_text(get_key(cfg, k)) for k in SHAPE_KEYS), card)


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


def card_matches(wanted: str, have: str) -> bool:
    return wanted == have or (wanted == UNKNOWN_GPU and have not in ("", cards.CPU))
