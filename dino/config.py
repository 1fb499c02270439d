"""The typed configuration of a DINO run: one dataclass per component composed into `DinoConfig`.

YAML presets in `dino/conf/<group>/` only pick values; Hydra's compose API merges them with command
line overrides and the result is converted once (`OmegaConf.to_object`) into these dataclasses, so
code below the entry point never sees a `DictConfig`. `validate` names the offending key and the
allowed values before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

# Architecture name -> timm model name and the kwargs that shape it.
ARCHS: dict[str, tuple[str, dict[str, int]]] = {
    "vit_test": ("vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 2}),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
}
PRECISIONS = ("bf16", "fp16", "fp32")
BAD_IMAGE_MODES = ("skip", "fail")  # data.on_bad_image (dino/bad_images.py)
DATASETS = ("synthetic", "fashion_mnist", "imagefolder", "webdataset")
DEVICES = ("auto", "cpu", "cuda")

# Keys that cannot change a run's result: they may differ between a checkpoint and the config that
# resumes it, and they are left out of the config hash (the run id).
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "postgresql", "mysql", "databricks")
NON_SEMANTIC_KEYS = (
    "run.dir",
    "tracking.",
    "storage.",
    "train.workers",
    "train.log_every",
    "train.max_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.keep_last",
    "train.progress",
    "train.wait_for_lock",
    "train.device",
    "train.compile",
    "monitor.",
    "data.on_bad_image",  # switching fail -> skip must resume the same run
    # The collapse guard decides when to stop, never what a step computes: turning it off resumes
    # the same run (that is how a collapsed run is trained on), and old run ids stay as they were.
    "train.collapse_stop",
    "train.collapse_patience_steps",
    "train.collapse_uniform_margin",
    "train.collapse_one_dim_fraction",
    "train.collapse_kl_flat",
    "train.collapse_kl_range",
)


# Keys added after runs existed, with the value that reproduces the old behaviour: left out of the
# run id (and of resume comparisons) at that value, so existing runs keep their ids and folders.
LATER_KEYS = {"data.augment_device": "auto", "train.init_weights": "", "train.init_weights_key": "teacher"}
AUGMENT_DEVICES = ("auto", "cpu", "gpu")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    name: str = "vit_small"
    """Backbone: vit_test (2 blocks, 64 wide, for tests), vit_tiny, vit_small or vit_base."""
    patch_size: int = 16
    """Patch size in pixels; must divide crops.global_size and crops.local_size."""
    drop_path: float = 0.1
    """Stochastic depth rate of the student (the teacher has none)."""


@dataclass
class HeadConfig:
    out_dim: int = 65536
    """K, the number of prototypes (dimension of the softmax)."""
    hidden_dim: int = 2048
    """Width of the head's MLP."""
    bottleneck_dim: int = 256
    """Dimension before the weight-normalised last layer."""
    num_layers: int = 3
    """Linear layers in the MLP before the bottleneck output."""
    norm_last_layer: bool = True
    """Fix the last layer's weight norm (weight_g = 1, frozen); stabilises training."""


@dataclass
class CropsConfig:
    global_size: int = 224
    """Side of the 2 global crops (student and teacher)."""
    local_size: int = 96
    """Side of the local crops (student only)."""
    num_local: int = 10
    """Number of local crops per image; 0 disables multi-crop."""
    global_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of RandomResizedCrop for global crops."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of RandomResizedCrop for local crops."""


@dataclass
class TeacherConfig:
    momentum: float = 0.996
    """Start of the teacher EMA momentum; cosine schedule to 1."""
    temp: float = 0.04
    """Teacher softmax temperature after warm-up."""
    warmup_temp: float = 0.04
    """Teacher temperature at step 0; warms up linearly to `temp`."""
    warmup_temp_epochs: int = 0
    """Epochs of the teacher temperature warm-up."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the center subtracted from teacher logits."""


@dataclass
class OptimConfig:
    epochs: int = 100
    """Epochs of pretraining; all schedules span them."""
    batch_size: int = 64
    """Images per device per step."""
    lr: float = 0.0005
    """Peak learning rate per 256 images of global batch (linear scaling rule)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine schedule."""
    warmup_epochs: int = 10
    """Linear learning-rate warm-up."""
    weight_decay: float = 0.04
    """Weight decay at step 0 (not on biases and 1-D parameters)."""
    weight_decay_end: float = 0.4
    """Weight decay at the end of the cosine schedule."""
    clip_grad: float = 3.0
    """Per-parameter gradient norm clip; 0 disables."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer gets no update."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Dataset: synthetic (no files), fashion_mnist (Debian package), imagefolder or webdataset."""
    root: str = ""
    """Root of the dataset files (imagefolder: class folders; fashion_mnist: the idx .gz files;
    webdataset: the shards and index.json of `dinolab data pack`). Local path or s3:// URL."""
    split: str = "train"
    """Split used for pretraining."""
    num_samples: int = 512
    """synthetic: number of images."""
    image_size: int = 64
    """synthetic: side of the generated images."""
    num_classes: int = 10
    """synthetic: number of classes."""
    max_decode_size: int = 0
    """imagefolder: shorter side is resized down to this before augmentation; 0 keeps the original."""
    limit: int = 0
    """Use only the first N images of the split (0: all): quick experiments on a fixed subset."""
    augment_device: str = "auto"
    """Where the multi-crop augmentation runs: cpu (per image in the loader workers), gpu (workers only
    decode; batched on the training device, dino/batch_augment.py) or auto (gpu when CUDA is used)."""
    on_bad_image: str = "skip"
    """imagefolder, webdataset: an image that cannot be decoded is skipped (the next readable image is
    used in its place, warned and counted as skipped_images) or makes the run fail, naming the file."""


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of the initialisation, the data order and every augmentation."""
    precision: str = "bf16"
    """Autocast precision: bf16, fp16 (with loss scaling) or fp32."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    workers: int = 4
    """Data loader worker processes per device."""
    compile: bool = False
    """torch.compile the student's and teacher's backbones (the first steps pay the compile time)."""
    max_steps: int = 0
    """Stop after this global step (0: run all epochs); schedules still span all epochs."""
    log_every: int = 10
    """Steps between metric reductions (the only host synchronisation of the step)."""
    checkpoint_every_steps: int = 500
    """Steps between checkpoints (0: only by time and at the end)."""
    checkpoint_every_minutes: float = 30.0
    """Minutes between checkpoints (0: only by steps and at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are removed once a newer one is complete."""
    progress: bool = True
    """Show a live progress bar when the console is a terminal."""
    wait_for_lock: bool = False
    """When another process trains this run.dir: wait for it to end (true) instead of refusing to
    start (false). A requeued job whose previous allocation is still ending always waits."""
    init_weights: str = ""
    """Start student and teacher from this weights file (dino/weights.py formats: the reference's .pth
    or checkpoint.pth, timm, a dinolab checkpoint or export): the backbone, and the head when the file
    holds one. A fresh run's step 0, not a resume; part of the run's identity."""
    init_weights_key: str = "teacher"
    """Which network of a file that holds both: teacher or student."""
    collapse_stop: bool = True
    """Stop the run (final checkpoint, state `collapsed`, exit 0) once its teacher output has stayed
    collapsed for collapse_patience_steps after the warm-up (dino/collapse.py, docs/collapse.md)."""
    collapse_patience_steps: int = 500
    """Steps (whole log windows) the collapse signal must hold in a row before the run stops."""
    collapse_uniform_margin: float = 0.2
    """Uniform collapse: teacher entropy >= ln K - this (nats)."""
    collapse_one_dim_fraction: float = 0.05
    """One-dimension collapse: teacher entropy < this fraction of ln K."""
    collapse_kl_flat: float = 0.01
    """One-dimension collapse also needs the student-teacher KL <= this (nats): the student matches
    the constant teacher (a sharp, healthy teacher keeps it well above)."""
    collapse_kl_range: float = 0.1
    """Uniform collapse also needs a flat KL: <= collapse_kl_flat, or within this range (nats) over
    the whole stretch (a tiny student may never match a uniform teacher exactly)."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, checkpoints/, metrics.jsonl, train.log."""


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI (sqlite:////abs/path/mlflow.db or http://server:5000); empty disables tracking."""
    experiment: str = "dinolab"
    """Experiment of a run started by `dinolab train` (a sweep uses one experiment named after it)."""
    run_name: str = ""
    """MLflow run name of a new run; empty: the run folder's name."""
    flush_timeout_s: float = 60.0
    """At exit, how long to wait for an unreachable store before spooling metrics to disk."""


@dataclass
class StorageConfig:
    endpoint_url: str = ""
    """S3-compatible endpoint (empty: AWS_ENDPOINT_URL or AWS). Credentials come only from the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), never from configs."""
    region: str = ""
    """Object-store region (empty: AWS_DEFAULT_REGION or the endpoint's default)."""


@dataclass
class MonitorConfig:
    """Periodic k-NN of the teacher during pretraining: a learning curve without separate jobs.
    It never changes the training (random state saved and restored around it)."""

    knn_every_epochs: float = 0.0
    """Run the k-NN monitor every N epochs (fractions allowed); 0 with knn_every_steps=0: off."""
    knn_every_steps: int = 0
    """Run the k-NN monitor every N steps instead (takes precedence over knn_every_epochs)."""
    knn_train: int = 5000
    """Bank images: evenly spaced over the train split (so class-sorted folders give every class)."""
    knn_test: int = 1000
    """Query images: evenly spaced over the test split."""
    knn_k: int = 20
    """Neighbours of the weighted vote (temperature 0.07, as `dinolab eval knn`)."""
    val_root: str = ""
    """imagefolder/webdataset: the labelled test images (fashion_mnist and synthetic have their own)."""


@dataclass
class DinoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def register_configs() -> None:
    """Register the schema so YAML presets and overrides are type-checked against it."""
    # Hydra is imported here, not at the top: commands that only read a sweep's files (status)
    # should not pay its import.
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dino_schema", node=DinoConfig)


# --------------------------------------------------------------------------------------------------
# Composition (Hydra compose API) and conversion
# --------------------------------------------------------------------------------------------------


def compose(overrides: list[str] | tuple[str, ...] = (), check: bool = True) -> DinoConfig:
    """Compose `dino/conf/config.yaml` with Hydra overrides and return a validated `DinoConfig`
    (`check=False`: not validated, for a preset that later overrides complete)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dino.conf", version_base="1.3"):
            dict_cfg = hydra_compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(dict_cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain_compose_error(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    if check:
        validate(cfg)
    return cfg


def _explain_compose_error(err: Exception, overrides: list[str] | tuple[str, ...]) -> str:
    """Turn Hydra/OmegaConf errors into one line naming the key and the nearest valid name."""
    from omegaconf.errors import OmegaConfBaseException, ValidationError

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__  # Hydra's "Error merging override" wraps OmegaConf's reason
    if cause is not None and cause.full_key:
        return _explain_type_error(cause, overrides)
    msg = str(err).strip().splitlines()[0]
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if "=" not in ov:
            continue
        if "." not in key and key in {f.name for f in dataclasses.fields(DinoConfig)}:
            continue  # a config group choice; Hydra's own message lists the options
        valid = sorted(flatten(to_dict(DinoConfig())))
        if key not in valid and "." in key:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            return f"unknown config key '{key}'{hint}"
    if isinstance(err, OmegaConfBaseException) and err.full_key and err.msg:
        return f"{err.full_key}: {err.msg.strip().splitlines()[0]}"  # without reference_type=... lines
    full = str(err).strip().replace("\n", " ")
    return full if len(full) < 400 else msg


# What a value of a schema type must be, by the type's name as written in the dataclasses above.
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "tuple[float, float]": "a list of 2 numbers",
}


def _schema_field(key: str) -> tuple[str, Any] | None:
    """(type name, default) of a dotted schema key, e.g. ('int', 64) for optim.batch_size."""
    *parents, name = key.split(".")
    node: Any = DinoConfig()
    for part in parents:
        node = getattr(node, part, None)
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
        return None
    hint = typing.get_type_hints(type(node))[name]
    type_name = str(hint) if typing.get_origin(hint) else hint.__name__  # tuple[float, float] / int
    return type_name, getattr(node, name)


def _explain_type_error(cause: Any, overrides: list[str] | tuple[str, ...]) -> str:
    """`optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64`: the key,
    the value as given, the reason and the expected type (OmegaConf's text only when the key is not
    a schema field)."""
    key = re.sub(r"(\[\d+\])+$", "", str(cause.full_key))  # crops.global_scale[0] -> crops.global_scale
    given = [ov.split("=", 1)[1] for ov in overrides if "=" in ov and ov.split("=", 1)[0].lstrip("+~") == key]
    value = given[-1] if given else cause.value
    schema = _schema_field(key)
    if schema is None:
        return f"{key}={value!r}: {(cause.msg or str(cause)).strip().splitlines()[0]}"
    type_name, default = schema
    words = _TYPE_WORDS.get(type_name, f"of type {type_name}")
    example = json.dumps(list(default) if isinstance(default, tuple) else default).replace(" ", "").strip('"')
    hint = f", e.g. {key}={example}" if example else ""
    return f"{key}={value!r} is not {words}; expected {type_name}{hint}"


def to_dict(cfg: DinoConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: dict[str, Any]) -> DinoConfig:
    """Rebuild a `DinoConfig` from `to_dict` output (e.g. a checkpoint's saved config)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DinoConfig), data)
    return OmegaConf.to_object(merged)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@functools.cache  # asked for every key of every run of a sweep
def is_semantic(key: str) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NON_SEMANTIC_KEYS)


def semantic_items(cfg: DinoConfig | dict[str, Any]) -> dict[str, Any]:
    flat = flatten(to_dict(cfg) if isinstance(cfg, DinoConfig) else cfg)
    return {k: v for k, v in flat.items() if is_semantic(k) and LATER_KEYS.get(k, object()) != v}


def config_hash(cfg: DinoConfig | dict[str, Any]) -> str:
    """Short hash of the keys that change the result: same hash, same run. `cfg` may also be its
    nested or flat (dotted keys) dict."""
    blob = json.dumps(semantic_items(cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def semantic_diff(saved: dict[str, Any], current: DinoConfig) -> list[str]:
    """Human-readable `key: saved -> current` lines for every semantic key that differs."""
    old, new = semantic_items(saved), semantic_items(current)
    return [
        f"{key}: {old.get(key, '<missing>')!r} -> {new.get(key, '<missing>')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


def _scale(key: str, value: tuple[float, float]) -> None:
    if len(value) != 2 or not (0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"{key}={list(value)} must be [low, high] with 0 < low <= high <= 1")


def validate(cfg: DinoConfig) -> None:
    """Raise `ConfigError` naming the key and the allowed values for the first impossible setting."""
    _choice("model.name", cfg.model.name, list(ARCHS))
    _choice("train.precision", cfg.train.precision, PRECISIONS)
    _choice("train.device", cfg.train.device, DEVICES)
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("data.augment_device", cfg.data.augment_device, AUGMENT_DEVICES)
    _choice("data.on_bad_image", cfg.data.on_bad_image, BAD_IMAGE_MODES)
    _positive("model.patch_size", cfg.model.patch_size)
    for key in ("crops.global_size", "crops.local_size"):
        size = getattr(cfg.crops, key.split(".")[1])
        _positive(key, size)
        if size % cfg.model.patch_size:
            raise ConfigError(f"{key}={size} must be a multiple of model.patch_size={cfg.model.patch_size}")
    if not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"model.drop_path={cfg.model.drop_path} must be in [0, 1)")
    _positive("crops.num_local", cfg.crops.num_local, allow_zero=True)
    _scale("crops.global_scale", cfg.crops.global_scale)
    _scale("crops.local_scale", cfg.crops.local_scale)
    for key in ("head.out_dim", "head.hidden_dim", "head.bottleneck_dim", "head.num_layers"):
        _positive(key, getattr(cfg.head, key.split(".")[1]))
    for key in ("teacher.temp", "teacher.warmup_temp", "teacher.student_temp"):
        _positive(key, getattr(cfg.teacher, key.split(".")[1]))
    for key in ("teacher.momentum", "teacher.center_momentum"):
        value = getattr(cfg.teacher, key.split(".")[1])
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must be in [0, 1]")
    _positive("optim.epochs", cfg.optim.epochs)
    _positive("optim.batch_size", cfg.optim.batch_size)
    _positive("optim.lr", cfg.optim.lr)
    for key in ("optim.min_lr", "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad"):
        _positive(key, getattr(cfg.optim, key.split(".")[1]), allow_zero=True)
    for key in ("optim.warmup_epochs", "optim.freeze_last_layer", "teacher.warmup_temp_epochs"):
        value = getattr(cfg.optim if key.startswith("optim") else cfg.teacher, key.split(".")[1])
        if not 0 <= value <= cfg.optim.epochs:
            raise ConfigError(f"{key}={value} must be between 0 and optim.epochs={cfg.optim.epochs}")
    for key in ("train.workers", "train.max_steps", "train.checkpoint_every_steps"):
        _positive(key, getattr(cfg.train, key.split(".")[1]), allow_zero=True)
    _positive("train.checkpoint_every_minutes", cfg.train.checkpoint_every_minutes, allow_zero=True)
    _positive("train.log_every", cfg.train.log_every)
    _positive("train.keep_last", cfg.train.keep_last)
    _positive("train.collapse_patience_steps", cfg.train.collapse_patience_steps, allow_zero=True)
    _positive("train.collapse_uniform_margin", cfg.train.collapse_uniform_margin, allow_zero=True)
    _positive("train.collapse_kl_flat", cfg.train.collapse_kl_flat, allow_zero=True)
    _positive("train.collapse_kl_range", cfg.train.collapse_kl_range, allow_zero=True)
    if not 0 <= cfg.train.collapse_one_dim_fraction < 1:
        raise ConfigError(
            f"train.collapse_one_dim_fraction={cfg.train.collapse_one_dim_fraction} must be in [0, 1)"
        )
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ConfigError("data=imagefolder needs data.root=<folder with one sub-folder per class>")
    if cfg.data.name == "webdataset" and not cfg.data.root:
        raise ConfigError(
            "data=webdataset needs data.root=<folder or s3:// prefix written by `dinolab data pack`>"
        )
    if cfg.data.name == "synthetic":
        _positive("data.num_samples", cfg.data.num_samples)
        _positive("data.image_size", cfg.data.image_size)
        _positive("data.num_classes", cfg.data.num_classes)
    _positive("data.limit", cfg.data.limit, allow_zero=True)
    if not cfg.run.dir:
        raise ConfigError("run.dir must name the run directory")
    if cfg.tracking.uri and not cfg.tracking.uri.startswith(TRACKING_SCHEMES):
        raise ConfigError(
            f"tracking.uri={cfg.tracking.uri} is not an MLflow store dinolab can use; give "
            "sqlite:////<absolute path>/mlflow.db or an `mlflow server` URL (http://host:port); "
            "MLflow 3 refuses plain ./mlruns folders"
        )
    _positive("tracking.flush_timeout_s", cfg.tracking.flush_timeout_s, allow_zero=True)
    _validate_monitor(cfg)


def _validate_monitor(cfg: DinoConfig) -> None:
    m = cfg.monitor
    _positive("monitor.knn_every_epochs", m.knn_every_epochs, allow_zero=True)
    _positive("monitor.knn_every_steps", m.knn_every_steps, allow_zero=True)
    for key in ("monitor.knn_train", "monitor.knn_test", "monitor.knn_k"):
        _positive(key, getattr(m, key.split(".")[1]))
    on = bool(m.knn_every_epochs or m.knn_every_steps)
    if on and cfg.data.name in ("imagefolder", "webdataset") and not m.val_root:
        raise ConfigError(
            f"monitor.knn_every_* with data={cfg.data.name} needs monitor.val_root=<the labelled "
            "validation images, as data.val_root of `dinolab eval knn`>"
        )
