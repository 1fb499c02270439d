"""The typed configuration of an evaluation (k-NN, linear probe) and how overrides become one.

An evaluation reads a run: its checkpoint (the newest complete one unless `checkpoint=` names one)
and the config saved in it. The data defaults to the run's own data config; `data=<preset>` swaps in
a preset of `dino/conf/data/` and `data.<key>=...` changes single keys. Overrides use the dotted
syntax of `dinolab train` (`knn.k=[10,20] linear.epochs=10`), read by dino/config/overrides.py and merged
into these dataclasses, so a typo fails naming the key and the nearest valid one.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import yaml

from dino.config.compose import preset_file, preset_name
from dino.config.identity import marked_fields
from dino.config.overrides import apply, split_all
from dino.config.schema import ConfigError, DataConfig, not_in_run_id, to_dict
from dino.config.validate import check_choice, check_positive

BASELINES = ("none", "random", "pixels")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvalDataConfig(DataConfig):
    """The run's data config plus what only evaluation needs."""

    val_root: str = ""
    """imagefolder: root of the validation images (<val_root>/<class>/<image>), the k-NN queries."""


@dataclass
class KnnConfig:
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    """Numbers of neighbours; each is clipped to the size of the feature bank. 20 is the headline."""
    temperature: float = 0.07
    """T of the vote weights exp(similarity / T)."""
    query_chunk: int = 0
    """Test queries per similarity block; 0 sizes it from the device memory."""
    bank_chunk: int = 0
    """Bank (train) features per similarity block; 0 sizes it from the device memory."""
    max_train: int = 0
    """Use only N evenly spaced images of the train split as the bank (0: all); every class of a
    folder sorted by class is in it."""
    max_test: int = 0
    """Use only N evenly spaced images of the test split as queries (0: all)."""


@dataclass
class LinearConfig:
    """The probe's settings. Its id (dino/eval/linear.py:probe_id, part of the probe's folder name) is
    the hash of these fields but those marked `not_in_run_id`, as a run's id is of `DinoConfig`'s; a
    field added here needs `added_later` (dino/config/schema.py) or existing probes start again."""

    epochs: int = 100
    """Epochs of the probe; the cosine learning-rate schedule spans them."""
    max_epochs: int = not_in_run_id(0)
    """Stop after this epoch (0: run all); run again with a higher value to continue."""
    batch_size: int = 256
    """Images per step (global)."""
    lr: Any = 0.001
    """Learning rate per 256 images (lr = linear.lr * batch_size / 256); a list ([0.0001,0.001,0.01])
    trains one head per value on the same frozen features in one pass and reports the one that is best
    on a held-out part of the train split (`val_fraction`), never chosen on the test split."""
    val_fraction: float = 0.1
    """With a list of lr: the part of the train split held out (fixed by `seed`) to choose the lr."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """SGD weight decay."""
    n_last_blocks: int = 4
    """Concatenate the (normed) CLS tokens of this many last blocks."""
    avgpool: bool = False
    """Also concatenate the average-pooled patch tokens of the last block (ViT-B style)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the train-time RandomResizedCrop."""
    max_train: int = 0
    """Train on N evenly spaced images of the train split only (0: all)."""
    max_test: int = 0
    """Evaluate on N evenly spaced images of the test split only (0: all)."""


@dataclass
class EvalRunConfig:
    dir: str = ""
    """Run directory to evaluate; results go to <run.dir>/eval/."""


@dataclass
class EvalModelConfig:
    name: str = ""
    """weights=: the backbone (vit_test, vit_tiny, vit_small, vit_base); empty: the one whose width
    and depth the file's tensors have."""
    patch_size: int = 0
    """weights=: patch size; 0: read from the file."""


@dataclass
class EvalConfig:
    run: EvalRunConfig = field(default_factory=EvalRunConfig)
    checkpoint: str = ""
    """A checkpoint folder (<run>/checkpoints/<step>); empty: the run's newest complete checkpoint."""
    weights: str = ""
    """A weights file instead of a run: the reference's released .pth or checkpoint.pth, a timm
    .safetensors/.pth, a dinolab state.pt or export (dino/io/weights.py); needs data=. Results go to
    run.dir (default runs/weights/<file>-<hash>)."""
    weights_key: str = "teacher"
    """Which network of a file that holds both: teacher or student."""
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    tracking_uri: str = ""
    """weights=: also log the result to this MLflow store (sqlite:////abs/mlflow.db or a server URL),
    one MLflow run per weights file and key (a run folder's evaluations go to the run's own MLflow run)."""
    tracking_experiment: str = "weights"
    """weights=: the MLflow experiment of those runs."""
    baseline: str = "none"
    """none (the checkpoint's teacher), random (same architecture, random init) or pixels."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Dataset of the bank/train and query/test splits; defaults to the run's data config."""
    image_size: int = 0
    """Side of the center crop fed to the backbone; 0: the run's crops.global_size."""
    seed: int = 0
    """Seed of the probe's initialisation, data order and augmentation."""
    baseline_seed: int = -1
    """Seed of baseline=random; -1: the run's train.seed, i.e. exactly the run's initial backbone."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    batch_size: int = 256
    """Images per forward pass while extracting features."""
    shard_size: int = 2048
    """Images per cached feature shard (the unit a preempted evaluation resumes at)."""
    workers: int = 2
    """Data loader worker processes."""
    hang_timeout_s: float = 600.0
    """Seconds a rank may go without progress (a batch of features or of the probe) before the job
    stops as `hung` with every live rank's stacks in <run>/eval/health/ (0: never); see train.hang_timeout_s."""
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)


def _parent(path: str) -> str:
    path = path.rstrip("/")
    return posixpath.dirname(path) if "://" in path else os.path.dirname(path)


def run_dir_of_checkpoint(path: str) -> str:
    """<run>/checkpoints/<step> -> <run>."""
    return _parent(_parent(path))


def _data_preset(name: str) -> dict[str, Any]:
    """The keys of data preset `name` (plain YAML: the eval config has no Hydra defaults list)."""
    return yaml.safe_load(preset_file("data", name).read_text()) or {}


def data_identity(data: EvalDataConfig) -> dict[str, Any]:
    """The data config as it identifies cached features and results: without the keys the schema
    marks as unable to change a result (the pretraining-only `augment_device` and `on_bad_image`: a
    failed image gives none), both added later; including them would orphan every existing cache."""
    left_out = marked_fields(DataConfig)
    return {k: v for k, v in to_dict(data).items() if k not in left_out}


def compose_eval(
    overrides: list[str] | tuple[str, ...], run_data: dict[str, Any] | None = None
) -> EvalConfig:
    """EvalConfig from `key=value` overrides; `run_data` (the run's data config) is the data default.

    Without `run_data` the run is looked up from `run.dir`/`checkpoint` by the caller (see
    `dino.eval.evaluated.resolve`), which calls this again with it.
    """
    pairs = [("model.name", v) if k == "model" else (k, v) for k, v in split_all(overrides)]
    preset = [v for k, v in pairs if k == "data"]
    pairs = [(k, v) for k, v in pairs if k != "data"]
    data: dict[str, Any] = dict(run_data or {})
    if preset:
        data = _data_preset(preset_name(preset[-1]))
    cfg = apply(EvalConfig, pairs, {"data": data} if data else None)
    validate_eval(cfg)
    return cfg


def validate_eval(cfg: EvalConfig) -> None:
    """Raise `ConfigError` naming the key for the first impossible setting."""
    if not cfg.run.dir and not cfg.checkpoint and not cfg.weights:
        raise ConfigError(
            "name the run to evaluate: run.dir=<run folder>, checkpoint=<checkpoint folder> or weights=<file>"
        )
    check_choice("baseline", cfg.baseline, BASELINES)
    check_choice("device", cfg.device, DEVICES)
    for key in ("batch_size", "shard_size", "linear.epochs", "linear.batch_size", "linear.n_last_blocks"):
        obj = cfg.linear if key.startswith("linear.") else cfg
        check_positive(key, getattr(obj, key.split(".")[-1]))
    for key in ("workers", "image_size", "knn.query_chunk", "knn.bank_chunk", "knn.max_train",
                "knn.max_test", "linear.max_epochs", "linear.max_train", "linear.max_test",
                "linear.weight_decay"):  # fmt: skip
        obj = cfg.knn if key.startswith("knn.") else cfg.linear if key.startswith("linear.") else cfg
        check_positive(key, getattr(obj, key.split(".")[-1]), allow_zero=True)
    if not cfg.knn.k or any(k <= 0 for k in cfg.knn.k):
        raise ConfigError(f"knn.k={cfg.knn.k} must be a non-empty list of positive integers")
    check_positive("knn.temperature", cfg.knn.temperature)
    lrs = cfg.linear.lr if isinstance(cfg.linear.lr, list) else [cfg.linear.lr]
    if not lrs or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in lrs):
        raise ConfigError(f"linear.lr={cfg.linear.lr} must be a positive number or a non-empty list of them")
    if not 0 < cfg.linear.val_fraction < 1:
        raise ConfigError(f"linear.val_fraction={cfg.linear.val_fraction} must be in (0, 1)")
    if not 0 <= cfg.linear.momentum < 1:
        raise ConfigError(f"linear.momentum={cfg.linear.momentum} must be in [0, 1)")
    lo, hi = cfg.linear.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(
            f"linear.scale={list(cfg.linear.scale)} must be [low, high] with 0 < low <= high <= 1"
        )
