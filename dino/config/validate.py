"""`validate`: the first impossible setting of a `DinoConfig`, as one `ConfigError` naming the key and
what is allowed, before any work starts. Plain Python: no Hydra, no OmegaConf."""

from __future__ import annotations

from dino.config.schema import (
    ARCHS,
    AUGMENT_DEVICES,
    BAD_IMAGE_MODES,
    CODE_CHANGE_POLICIES,
    DATASETS,
    DEVICES,
    PRECISIONS,
    TRACKING_SCHEMES,
    ConfigError,
    DinoConfig,
)
from dino.config.suggest import not_allowed


def check_choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    message = not_allowed(key, value, allowed)
    if message:
        raise ConfigError(message)


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


def _scale(key: str, value: tuple[float, float]) -> None:
    if len(value) != 2 or not (0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"{key}={list(value)} must be [low, high] with 0 < low <= high <= 1")


def validate(cfg: DinoConfig) -> None:
    """Raise `ConfigError` naming the key and the allowed values for the first impossible setting."""
    check_choice("model.name", cfg.model.name, list(ARCHS))
    check_choice("train.precision", cfg.train.precision, PRECISIONS)
    check_choice("train.device", cfg.train.device, DEVICES)
    check_choice("train.on_code_change", cfg.train.on_code_change, CODE_CHANGE_POLICIES)
    if not 0 <= cfg.train.stop_at <= 1:
        raise ConfigError(
            f"train.stop_at={cfg.train.stop_at} must be a fraction of the schedule in [0, 1] (0: its end)"
        )
    if cfg.train.hang_timeout_s < 0:
        raise ConfigError(
            f"train.hang_timeout_s={cfg.train.hang_timeout_s}: seconds, >= 0 (0 turns the watchdog off)"
        )
    check_choice("data.name", cfg.data.name, DATASETS)
    check_choice("data.augment_device", cfg.data.augment_device, AUGMENT_DEVICES)
    check_choice("data.on_bad_image", cfg.data.on_bad_image, BAD_IMAGE_MODES)
    check_positive("model.patch_size", cfg.model.patch_size)
    for key in ("crops.global_size", "crops.local_size"):
        size = getattr(cfg.crops, key.split(".")[1])
        check_positive(key, size)
        if size % cfg.model.patch_size:
            raise ConfigError(f"{key}={size} must be a multiple of model.patch_size={cfg.model.patch_size}")
    if not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"model.drop_path={cfg.model.drop_path} must be in [0, 1)")
    check_positive("crops.num_local", cfg.crops.num_local, allow_zero=True)
    _scale("crops.global_scale", cfg.crops.global_scale)
    _scale("crops.local_scale", cfg.crops.local_scale)
    for key in ("head.out_dim", "head.hidden_dim", "head.bottleneck_dim", "head.num_layers"):
        check_positive(key, getattr(cfg.head, key.split(".")[1]))
    for key in ("teacher.temp", "teacher.warmup_temp", "teacher.student_temp"):
        check_positive(key, getattr(cfg.teacher, key.split(".")[1]))
    for key in ("teacher.momentum", "teacher.center_momentum"):
        value = getattr(cfg.teacher, key.split(".")[1])
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must be in [0, 1]")
    check_positive("optim.epochs", cfg.optim.epochs)
    check_positive("optim.batch_size", cfg.optim.batch_size)
    check_positive("optim.lr", cfg.optim.lr)
    for key in ("optim.min_lr", "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad"):
        check_positive(key, getattr(cfg.optim, key.split(".")[1]), allow_zero=True)
    for key in ("optim.warmup_epochs", "optim.freeze_last_layer", "teacher.warmup_temp_epochs"):
        value = getattr(cfg.optim if key.startswith("optim") else cfg.teacher, key.split(".")[1])
        if not 0 <= value <= cfg.optim.epochs:
            raise ConfigError(f"{key}={value} must be between 0 and optim.epochs={cfg.optim.epochs}")
    for key in ("train.workers", "train.max_steps", "train.checkpoint_every_steps"):
        check_positive(key, getattr(cfg.train, key.split(".")[1]), allow_zero=True)
    check_positive("train.checkpoint_every_minutes", cfg.train.checkpoint_every_minutes, allow_zero=True)
    check_positive("train.log_every", cfg.train.log_every)
    check_positive("train.keep_last", cfg.train.keep_last)
    check_positive("train.collapse_patience_steps", cfg.train.collapse_patience_steps, allow_zero=True)
    check_positive("train.collapse_uniform_margin", cfg.train.collapse_uniform_margin, allow_zero=True)
    check_positive("train.collapse_kl_flat", cfg.train.collapse_kl_flat, allow_zero=True)
    check_positive("train.collapse_kl_range", cfg.train.collapse_kl_range, allow_zero=True)
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
        check_positive("data.num_samples", cfg.data.num_samples)
        check_positive("data.image_size", cfg.data.image_size)
        check_positive("data.num_classes", cfg.data.num_classes)
    check_positive("data.limit", cfg.data.limit, allow_zero=True)
    if not cfg.run.dir:
        raise ConfigError("run.dir must name the run directory")
    if cfg.tracking.uri and not cfg.tracking.uri.startswith(TRACKING_SCHEMES):
        raise ConfigError(
            f"tracking.uri={cfg.tracking.uri} is not an MLflow store dinolab can use; give "
            "sqlite:////<absolute path>/mlflow.db or an `mlflow server` URL (http://host:port); "
            "MLflow 3 refuses plain ./mlruns folders"
        )
    check_positive("tracking.flush_timeout_s", cfg.tracking.flush_timeout_s, allow_zero=True)
    _validate_monitor(cfg)


def _validate_monitor(cfg: DinoConfig) -> None:
    m = cfg.monitor
    check_positive("monitor.knn_every_epochs", m.knn_every_epochs, allow_zero=True)
    check_positive("monitor.knn_every_steps", m.knn_every_steps, allow_zero=True)
    for key in ("monitor.knn_train", "monitor.knn_test", "monitor.knn_k"):
        check_positive(key, getattr(m, key.split(".")[1]))
    on = bool(m.knn_every_epochs or m.knn_every_steps)
    if on and cfg.data.name in ("imagefolder", "webdataset") and not m.val_root:
        raise ConfigError(
            f"monitor.knn_every_* with data={cfg.data.name} needs monitor.val_root=<the labelled "
            "validation images, as data.val_root of `dinolab eval knn`>"
        )
