"""A run's reproducibility record: `repro.json` in its run folder (docs/reproducibility.md).

`build_record(cfg, hosts, code_hash)` says what this start of the run is made of: the code (its hash,
commit, whether the tree was dirty and its diff), the versions of the packages that shape a result,
Python, torch with CUDA, cuDNN and NCCL, the host of every rank, the SLURM job, the seeds as the code
derives them, the config hash and the time. `write_record(run_dir, record)` writes it (rank 0, through
dino/io/storage.py, so an s3:// run folder works); a resumed run keeps the starts before it in
`starts`.

The source: a sweep's code snapshot writes `source.json` beside the `dino` package it copies
(code_hash, commit, dirty, diff, source_dir, created); it is read as it is. Without one, git is asked
in the folder holding the package; a folder that is no git checkout, or no git, gives commit "" and
dirty null. Nothing here fails a run: a field it cannot know is empty.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from dino.config.identity import config_hash
from dino.config.schema import DinoConfig
from dino.io import storage

log = logging.getLogger("dino.train")

FILE = "repro.json"
# The distributions whose versions can change a result or how it is stored and reported.
PACKAGES = ("dinolab", "torch", "torchvision", "timm", "numpy", "submitit", "hydra-core", "omegaconf", "mlflow",
            "pandas", "fsspec", "s3fs", "webdataset", "kornia")  # fmt: skip
# SLURM's environment -> the record's `slurm` keys.
SLURM_ENV = {
    "job_id": ("SLURM_JOB_ID",),
    "array_job_id": ("SLURM_ARRAY_JOB_ID",),
    "array_task_id": ("SLURM_ARRAY_TASK_ID",),
    "restart_count": ("SLURM_RESTART_COUNT",),
    "nodelist": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "partition": ("SLURM_JOB_PARTITION",),
}
MAX_DIFF_CHARS = 1_000_000  # a diff past this is cut (and `diff_truncated` says so)
_GIT_TIMEOUT_S = 10


def package_root() -> Path:
    """The folder holding the `dino` package (a checkout's root, a snapshot's folder, site-packages)."""
    return Path(__file__).resolve().parents[2]


def build_record(cfg: DinoConfig, hosts: list[str], code_hash: str) -> dict[str, Any]:
    """What this start of the run is made of; `hosts[i]` is the host of rank i (gathered from every
    rank by the caller), `code_hash` the hash of the code it runs."""
    import torch

    return {
        "code_hash": code_hash,
        "source": source_info(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "torch": torch_versions(torch),
        "hosts": list(hosts),
        "world_size": len(hosts),
        "slurm": slurm_ids(),
        "seeds": seeds(cfg, len(hosts)),
        "config_hash": config_hash(cfg),
        "run_dir": cfg.run.dir,
        "newest_checkpoint": _newest_checkpoint(cfg.run.dir),
        "started": _now(),
    }


def write_record(run_dir: str, record: dict[str, Any]) -> str:
    """Write `record` as `<run_dir>/repro.json` (whole or not at all) and return its path. When the
    file is there already (a resumed or requeued run) its `starts` are kept and this start is added to
    them, so where every earlier attempt ran is not lost."""
    path = storage.join(run_dir, FILE)
    starts: list[dict[str, Any]] = []
    if storage.exists(path):
        try:
            before = json.loads(storage.read_text(path))
            starts = list(before.get("starts") or [start_of(before)])
        except (ValueError, TypeError, AttributeError, storage.StorageError) as err:
            log.warning("%s could not be read (%s): its earlier starts are not kept", path, err)
    record = {**record, "starts": [*starts, start_of(record)]}
    storage.atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def start_of(record: dict[str, Any]) -> dict[str, Any]:
    """One start of a run, as `starts` keeps it."""
    source = record.get("source") or {}
    return {
        "time": record.get("started", ""),
        "hosts": record.get("hosts", []),
        "slurm": record.get("slurm", {}),
        "code_hash": record.get("code_hash", ""),
        "commit": source.get("commit", ""),
        "dirty": source.get("dirty"),
        "newest_checkpoint": record.get("newest_checkpoint"),
    }


# ---- the parts ---------------------------------------------------------------------------------------


def source_info(root: Path | None = None) -> dict[str, Any]:
    """The code's origin: a snapshot's `source.json` beside the package when there is one, else git in
    the folder holding it (commit "", dirty None: not a git checkout, or no git)."""
    root = root or package_root()
    snapshot = root / "source.json"
    if snapshot.is_file():
        try:
            found = json.loads(snapshot.read_text())
            return {"from": str(snapshot), **found}
        except (OSError, ValueError) as err:
            log.warning("%s could not be read (%s): asking git instead", snapshot, err)
    return {"from": "git", **git_source(root)}


def git_source(root: Path) -> dict[str, Any]:
    """{commit, dirty, diff, untracked, source_dir} of the checkout holding `root/dino`; commit "" and
    dirty None when `root` is no git checkout of it (e.g. site-packages inside some other repository's
    ignored venv) or git is missing."""
    unknown = {"commit": "", "dirty": None, "diff": "", "untracked": [], "source_dir": str(root)}
    commit = _git(root, "rev-parse", "HEAD")
    # The package itself must be tracked, or `root` only lies inside someone else's checkout.
    if not commit or _git(root, "ls-files", "--error-unmatch", "dino/__init__.py") is None:
        return unknown
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    diff = _git(root, "diff", "HEAD", "--no-color", "--no-ext-diff")
    if status is None or diff is None:
        return {**unknown, "commit": commit}
    untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
    found: dict[str, Any] = {"commit": commit, "dirty": bool(status.strip()), "diff": diff[:MAX_DIFF_CHARS],
                             "untracked": untracked, "source_dir": str(root)}  # fmt: skip
    if len(diff) > MAX_DIFF_CHARS:
        found["diff_truncated"] = len(diff)
    return found


def _git(root: Path, *args: str) -> str | None:
    """git's stdout (None: it failed, is missing or hung)."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=_GIT_TIMEOUT_S, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """PACKAGES' installed versions (those not installed are left out)."""
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def torch_versions(torch: Any) -> dict[str, Any]:
    """torch's version and the CUDA, cuDNN and NCCL it runs with, and the GPU (None where there is none)."""

    def asked(fn) -> Any:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - a build without it
            return None

    nccl = asked(torch.cuda.nccl.version) if asked(torch.distributed.is_nccl_available) else None
    if isinstance(nccl, tuple | list):
        nccl = ".".join(str(v) for v in nccl)
    elif nccl is not None:
        nccl = str(nccl)
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": asked(torch.backends.cudnn.version),
        "nccl": nccl,
        # The card of rank 0 once CUDA is in use (asking earlier would initialise CUDA here).
        "gpu": asked(torch.cuda.get_device_name) if asked(torch.cuda.is_initialized) else None,
    }


def slurm_ids(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The SLURM job this process runs in ({} outside SLURM)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return {}
    return {key: next((env[n] for n in names if env.get(n)), None) for key, names in SLURM_ENV.items()}


def seeds(cfg: DinoConfig, world_size: int) -> dict[str, Any]:
    """The seeds as the code derives them, all from train.seed: each rank's torch RNG at a fresh start
    (dino/run/loop.py:_resume; a resume restores the checkpoint's saved streams instead), the data
    order and every augmentation (dino/data/datasets.py, dino/data/train_data.py, dino/method/augment.py)."""
    seed = cfg.train.seed
    return {
        "train.seed": seed,
        "rank_torch_seeds": [seed + rank for rank in range(world_size)],
        "rank_torch_seeds_note": "torch.manual_seed(train.seed + rank) on a fresh start; a resume "
        "restores each rank's RNG state saved in the checkpoint",
        "data": {
            "seed": seed,
            "order": "epoch e: a permutation from torch.Generator().manual_seed(seed * 100003 + e) "
            "(datasets.epoch_seed); webdataset shards: the shards permuted from that seed, shard s's "
            "images from (seed * 100003 + e) * 1000003 + s",
            "augmentation": {
                "per_image": "torch.manual_seed(augment.sample_seed(seed, epoch, index)) in the loader "
                "worker (index: the image's index in the folder, or its key in the shards)",
                "batched_on_device": "torch.Generator().manual_seed(augment.sample_seed(seed, step, rank))",
                "data.augment_device": cfg.data.augment_device,
            },
            "loader_generator": seed,
            "synthetic_images": "torch.Generator().manual_seed(seed * 1000003 + index)"
            if cfg.data.name == "synthetic"
            else None,
        },
    }


def _newest_checkpoint(run_dir: str) -> int | None:
    """The newest complete checkpoint's step when this start began (where it resumes; None: none)."""
    from dino.io import checkpoint

    try:
        steps = checkpoint.complete_steps(run_dir)
    except Exception:  # noqa: BLE001 - only for the record
        return None
    return steps[-1] if steps else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
