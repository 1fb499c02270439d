"""Weights from outside a run folder: the reference DINO's files, timm checkpoints, dinolab's own.

`read(path)` detects the format from the file itself and returns the backbone in timm's key layout
(the reference's ViT and timm's share it key for key) and, when the file holds one, the DINO head in
ours. Formats:
  - the reference's released backbones (`dino_deitsmall16_pretrain.pth` and kin): a plain state dict;
  - the reference's training checkpoint (`checkpoint.pth` of main_dino.py): `student` (with DDP's
    `module.` prefix) and `teacher`, each `backbone.*` + `head.*`, plus `args` (an argparse.Namespace),
    `epoch`, `optimizer`, `dino_loss`; `key=teacher|student` picks one;
  - timm checkpoints, `.safetensors` or `.pth` (a plain state dict, or one under `state_dict`/`model`),
    whose classifier (`head.*`) is dropped;
  - dinolab checkpoints (`<run>/checkpoints/<step>/state.pt`) and `dinolab export` files.
Nothing is unpickled beyond tensors: `torch.load(weights_only=True)`, with `argparse.Namespace`
allowed because the reference's checkpoints hold one.

`backbone_for(weights, name, patch_size)` builds our backbone and loads it strictly: missing,
unexpected or mis-shaped keys are an error that lists them and says which architecture the file looks
like (embed dim, depth and patch size read from the tensors' shapes).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dino.config.schema import ARCHS, ConfigError
from dino.io import storage
from dino.method.models import build_backbone

KEYS = ("teacher", "student")
# The reference's head saves its weight-normalised last layer with the pre-parametrization names.
_HEAD_RENAMES = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


class WeightsError(ConfigError):
    """A weights file that cannot be read or does not fit the model; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """What a backbone's tensors say about it (the number of heads is not in any shape)."""

    embed_dim: int
    depth: int
    patch_size: int
    img_size: int
    """Side the position embeddings were trained at (their grid times the patch size)."""

    def matches(self) -> list[str]:
        """dinolab model names with this width and depth."""
        return [name for name in ARCHS if _shape_of(name) == (self.embed_dim, self.depth)]

    def describe(self) -> str:
        names = self.matches()
        like = (
            f" (model={names[0]} model.patch_size={self.patch_size})"
            if names
            else " (no dinolab model has this width and depth)"
        )
        return (
            f"embed dim {self.embed_dim}, depth {self.depth}, patch {self.patch_size}, "
            f"{self.img_size} px{like}"
        )


@dataclass
class Weights:
    path: str
    format: str
    sha256: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    architecture: Architecture
    key: str = "teacher"
    step: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """Folder-safe name of these weights: file stem and hash (the hash is what identifies them)."""
        stem = posixpath.basename(self.path.rstrip("/")).split(".")[0] or "weights"
        return (
            f"{stem}-{self.key}-{self.sha256[:12]}" if self.head is not None else f"{stem}-{self.sha256[:12]}"
        )


@functools.cache  # a model built on the meta device per name, once per process
def _shape_of(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = build_backbone(name, 16, 224)
    return model.num_features, len(model.blocks)


def architecture(backbone: dict[str, torch.Tensor]) -> Architecture:
    try:
        embed_dim = int(backbone["cls_token"].shape[-1])
        patch = int(backbone["patch_embed.proj.weight"].shape[-1])
        tokens = int(backbone["pos_embed"].shape[1])
    except KeyError as err:
        raise WeightsError(f"not a ViT backbone: no {err.args[0]} tensor") from None
    depth = 1 + max(int(k.split(".")[1]) for k in backbone if k.startswith("blocks."))
    grid = math.isqrt(tokens - 1)
    return Architecture(embed_dim, depth, patch, grid * patch)


def _load_file(path: str, data: bytes) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: not a file we can read safely
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"cannot read {path} as weights (torch.load with weights_only=True: {first}); dinolab reads "
            "tensors, dicts and the reference's argparse.Namespace only, never arbitrary pickled objects"
        ) from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict or checkpoint")
    return loaded


def _strip(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def read(path: str, key: str = "teacher") -> Weights:
    """The weights in `path` (local or s3://); see the module docstring for the formats."""
    if key not in KEYS:
        raise WeightsError(f"weights_key={key!r} is not allowed; choose one of: {', '.join(KEYS)}")
    if not storage.exists(path):
        raise WeightsError(f"weights file {path} does not exist")
    data = storage.read_bytes(path)
    sha = hashlib.sha256(data).hexdigest()
    loaded = _load_file(path, data)
    step, info, head = None, {}, None
    if KEYS[0] in loaded and KEYS[1] in loaded:  # a training checkpoint: dinolab's or the reference's
        if "config" in loaded and "step" in loaded:
            fmt, step = "dinolab checkpoint", int(loaded["step"])
            info = {"config": loaded["config"]}
        else:
            fmt = "reference checkpoint"
            step = int(loaded["epoch"]) if "epoch" in loaded else None  # the reference counts epochs
            args = loaded.get("args")
            info = {"args": vars(args) if isinstance(args, argparse.Namespace) else args}
        net = loaded[key]
        net = _strip("module.", net) if all(k.startswith("module.") for k in net) else net
        backbone = _strip("backbone.", net)
        head = {_HEAD_RENAMES.get(k, k): v for k, v in _strip("head.", net).items()} or None
    else:
        for wrapper in ("state_dict", "model", "teacher_backbone"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
        if not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise WeightsError(f"{path}: not a state dict of tensors (keys {sorted(loaded)[:8]})")
        fmt = "timm safetensors" if path.endswith(".safetensors") else "backbone state dict"
        backbone = {k: v for k, v in loaded.items() if not k.startswith(("head.", "fc_norm."))}
        if any(k.startswith("fc_norm.") and v.numel() for k, v in loaded.items()):
            raise WeightsError(f"{path} uses fc_norm (global-pool ViTs); dinolab's ViT reads the CLS token")
        key = "teacher"  # one network only
    if not backbone:
        raise WeightsError(f"{path} holds no backbone tensors ({fmt})")
    return Weights(path, fmt, sha, backbone, head, architecture(backbone), key, step, info)


def _fit_report(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in mine.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            problems.append(f"{what}: {', '.join(keys[:4])}{more}")
    return problems


def backbone_for(weights: Weights, name: str = "", patch_size: int = 0, img_size: int = 0) -> nn.Module:
    """Our backbone (timm ViT, eval mode) with `weights` loaded strictly; name/patch size/img size
    default to what the file says (the first dinolab model of its width and depth)."""
    arch = weights.architecture
    if not name:
        names = arch.matches()
        if not names:
            raise WeightsError(f"{weights.path}: no dinolab model fits it: {arch.describe()}")
        name = names[0]
    if name not in ARCHS:
        raise WeightsError(f"model={name!r} is unknown; choose one of: {', '.join(ARCHS)}")
    model = build_backbone(name, patch_size or arch.patch_size, img_size or arch.img_size, 0.0)
    problems = _fit_report(model, weights.backbone)
    if problems:
        raise WeightsError(
            f"{weights.path} ({weights.format}) does not fit model={name} "
            f"model.patch_size={patch_size or arch.patch_size}: {'; '.join(problems)}. "
            f"The file looks like: {arch.describe()}"
        )
    model.load_state_dict(weights.backbone, strict=True)
    return model.eval()


def load_head(weights: Weights, head: nn.Module) -> nn.Module:
    """`weights`' DINO head into `head` (strictly); an error when the file has none."""
    if weights.head is None:
        raise WeightsError(f"{weights.path} ({weights.format}) holds no DINO head, only a backbone")
    problems = _fit_report(head, weights.head)
    if problems:
        raise WeightsError(f"the head in {weights.path} does not fit head.*: {'; '.join(problems)}")
    head.load_state_dict(weights.head, strict=True)
    return head
