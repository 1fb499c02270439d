"""The typed configuration of a DINO run: one dataclass per component composed into `DinoConfig`.

Plain dataclasses, no Hydra: YAML presets in `dino/conf/<group>/` only pick values, and
`dino/config/compose.py` merges them with command line overrides and converts the result once into
these dataclasses, so code below the entry point never sees a `DictConfig`. `dino/config/validate.py`
names the offending key and the allowed values before any work starts; `dino/config/identity.py` hashes
the keys that can change a result (the fields are marked here: `not_in_run_id`, `added_later`).
"""

from __future__ import annotations

import dataclasses
import json
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
BAD_IMAGE_MODES = ("skip", "fail")  # data.on_bad_image (dino/data/bad_images.py)
DATASETS = ("synthetic", "fashion_mnist", "imagefolder", "webdataset")
DEVICES = ("auto", "cpu", "cuda")
CODE_CHANGE_POLICIES = ("", "warn", "refuse")  # train.on_code_change; "": as the run was started

# MLflow stores dinolab can use (tracking.uri of a run, tracking_uri of a sweep).
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "postgresql", "mysql", "databricks")
AUGMENT_DEVICES = ("auto", "cpu", "gpu")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


# Run identity (dino/config/identity.py) reads these marks off the fields: a run's id is the hash of
# the keys that can change its result. The linear probe's id reads the same marks off
# `dino.eval.config.LinearConfig` (dino/eval/linear.py:probe_id).
NOT_IN_RUN_ID = "not_in_run_id"
ADDED_LATER = "added_later"


def not_in_run_id(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A key (or a whole section) that cannot change a run's result: it may differ between a
    checkpoint and the config that resumes it, and it is left out of the run id."""
    return field(default=default, metadata={NOT_IN_RUN_ID: True}, **kwargs)


def added_later(default: Any) -> Any:
    """A key added after runs existed, whose default reproduces the old behaviour: left out of the
    run id (and of resume comparisons) at that value, so existing runs keep their ids and folders."""
    return field(default=default, metadata={ADDED_LATER: default})


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
    augment_device: str = added_later("auto")
    """Where the multi-crop augmentation runs: cpu (per image in the loader workers), gpu (workers only
    decode; batched on the training device, dino/method/batch_augment.py) or auto (gpu when CUDA is used)."""
    on_bad_image: str = not_in_run_id("skip")  # switching fail -> skip must resume the same run
    """imagefolder, webdataset: an image that cannot be decoded is skipped (the next readable image is
    used in its place, warned and counted as skipped_images) or makes the run fail, naming the file."""
    num_images: Any = not_in_run_id(None)
    """Images of the dataset, for `sweep plan`'s cost estimate where the data cannot be counted (not
    mounted on the machine that plans): N, the images under data.root, or {train: N, val: M}, adding
    those under data.val_root (the evaluations' test split). Training never reads it; where the
    dataset can be counted, the count on disk is used (and a different num_images is warned about)."""


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of the initialisation, the data order and every augmentation."""
    precision: str = "bf16"
    """Autocast precision: bf16, fp16 (with loss scaling) or fp32."""
    device: str = not_in_run_id("auto")
    """auto (cuda when available), cpu or cuda."""
    workers: int = not_in_run_id(4)
    """Data loader worker processes per device."""
    compile: bool = not_in_run_id(False)
    """torch.compile the student's and teacher's backbones (the first steps pay the compile time)."""
    max_steps: int = not_in_run_id(0)
    """Stop after this global step (0: run all epochs); schedules still span all epochs."""
    stop_at: float = not_in_run_id(0.0)
    """Stop at this fraction of the schedule (0: at its end), with a complete checkpoint: a rung of a
    successive-halving search (launcher/halving.py). Schedules still span all epochs, so a run
    stopped here and continued is the run it would have been."""
    log_every: int = not_in_run_id(10)
    """Steps between metric reductions (the only host synchronisation of the step)."""
    checkpoint_every_steps: int = not_in_run_id(500)
    """Steps between checkpoints (0: only by time and at the end)."""
    checkpoint_every_minutes: float = not_in_run_id(30.0)
    """Minutes between checkpoints (0: only by steps and at the end)."""
    keep_last: int = not_in_run_id(3)
    """Complete checkpoints kept; older ones are removed once a newer one is complete."""
    progress: bool = not_in_run_id(True)
    """Show a live progress bar when the console is a terminal."""
    wait_for_lock: bool = not_in_run_id(False)
    """When another process trains this run.dir: wait for it to end (true) instead of refusing to
    start (false). A requeued job whose previous allocation is still ending always waits."""
    hang_timeout_s: float = not_in_run_id(600.0)
    """Seconds a rank may go without finishing a step (long phases get more: dino/run/watchdog.py)
    before the job stops as `hung`, with every live rank's stacks in run.dir/health/ (0: never). The
    process group's timeout follows it."""
    on_code_change: str = not_in_run_id("")
    """A resume with code other than the checkpoint's (its code hash): warn, refuse, or "" (as the run
    was started: a sweep's runs refuse, a `dinolab train` run warns)."""
    init_weights: str = added_later("")
    """Start student and teacher from this weights file (dino/io/weights.py formats: the reference's .pth
    or checkpoint.pth, timm, a dinolab checkpoint or export): the backbone, and the head when the file
    holds one. A fresh run's step 0, not a resume; part of the run's identity."""
    init_weights_key: str = added_later("teacher")
    """Which network of a file that holds both: teacher or student."""
    # The collapse guard decides when to stop, never what a step computes: turning it off resumes the
    # same run (that is how a collapsed run is trained on), and old run ids stay as they were.
    collapse_stop: bool = not_in_run_id(True)
    """Stop the run (final checkpoint, state `collapsed`, exit 0) once its teacher output has stayed
    collapsed for collapse_patience_steps after the warm-up (dino/method/collapse.py, docs/collapse.md)."""
    collapse_patience_steps: int = not_in_run_id(500)
    """Steps (whole log windows) the collapse signal must hold in a row before the run stops."""
    collapse_uniform_margin: float = not_in_run_id(0.2)
    """Uniform collapse: teacher entropy >= ln K - this (nats)."""
    collapse_one_dim_fraction: float = not_in_run_id(0.05)
    """One-dimension collapse: teacher entropy < this fraction of ln K."""
    collapse_kl_flat: float = not_in_run_id(0.01)
    """One-dimension collapse also needs the student-teacher KL <= this (nats): the student matches
    the constant teacher (a sharp, healthy teacher keeps it well above)."""
    collapse_kl_range: float = not_in_run_id(0.1)
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
    knn_at_end: bool = False
    """Also run it at the last step this process trains to (a search's rung: its metric), even when
    knn_every_* are 0."""
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
    run: RunConfig = not_in_run_id(default_factory=RunConfig)
    tracking: TrackingConfig = not_in_run_id(default_factory=TrackingConfig)
    storage: StorageConfig = not_in_run_id(default_factory=StorageConfig)
    monitor: MonitorConfig = not_in_run_id(default_factory=MonitorConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (`DinoConfig`, one of its sections, an evaluation's `EvalConfig`...) as the
    plain nested dict YAML and JSON take: nested dataclasses as dicts, tuples as lists."""
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
