"""Attention maps: the last block's CLS-to-patch attention per head, overlaid on the image (PNG).

timm's ViT attention uses fused scaled-dot-product attention, which never materialises the
attention matrix. A forward hook on the last block's `norm1` captures that block's attention input;
q and k are recomputed from it with the block's own `qkv` projection (and q/k norms), and
softmax(q k^T * scale) gives exactly the attention the fused kernel applied.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dino.config.overrides import apply, split_all
from dino.config.schema import ConfigError, from_dict
from dino.eval.config import EvalRunConfig
from dino.eval.evaluated import teacher_backbone
from dino.eval.splits import eval_transform
from dino.io import checkpoint, distributed, storage
from dino.io.checkpoint import CheckpointError

PANEL_INCHES = 2.5
DPI = 100
MAX_COLUMNS = 4


@dataclass
class VizConfig:
    run: EvalRunConfig = field(default_factory=EvalRunConfig)
    checkpoint: str = ""
    """A checkpoint folder; empty: the run's newest complete checkpoint."""
    weights: str = ""
    """A weights file instead of a run (the reference's .pth, timm, dinolab exports: dino/io/weights.py)."""
    weights_key: str = "teacher"
    """Which network of a file that holds both: teacher or student."""
    image: str = ""
    """The image file to look at (any format PIL reads)."""
    out: str = "attention.png"
    """Where the PNG goes."""
    image_size: int = 0
    """Side of the center crop fed to the backbone; 0: the run's crops.global_size."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""


def compose_viz(overrides: list[str] | tuple[str, ...]) -> VizConfig:
    cfg = apply(VizConfig, split_all(overrides))
    if not cfg.run.dir and not cfg.checkpoint and not cfg.weights:
        raise ConfigError(
            "name the run: run.dir=<run folder>, checkpoint=<checkpoint folder> or weights=<file>"
        )
    if not cfg.image:
        raise ConfigError("image=<file> is required")
    if not storage.exists(cfg.image):
        raise ConfigError(f"image={cfg.image} does not exist")
    return cfg


def last_block_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, tokens]: the softmax attention of the backbone's last block."""
    block = backbone.blocks[-1]
    captured: dict[str, torch.Tensor] = {}
    hook = block.norm1.register_forward_hook(lambda _m, _i, out: captured.__setitem__("x", out))
    try:
        with torch.no_grad():
            backbone.forward_features(images)
    finally:
        hook.remove()
    x = captured["x"]
    attn = block.attn
    b, n, _ = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def cls_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[batch, heads, grid_h, grid_w]: the last block's attention from CLS to every patch token."""
    weights = last_block_attention(backbone, images)
    b, heads = weights.shape[:2]
    patch = backbone.patch_embed.patch_size
    grid_h, grid_w = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
    return weights[:, :, 0, backbone.num_prefix_tokens :].reshape(b, heads, grid_h, grid_w)


def figure_layout(num_heads: int) -> tuple[int, int, tuple[int, int]]:
    """(rows, columns, (width, height) in pixels) of the figure: the image plus one panel per head."""
    panels = num_heads + 1
    cols = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / cols)
    return rows, cols, (round(cols * PANEL_INCHES * DPI), round(rows * PANEL_INCHES * DPI))


def render(image: torch.Tensor, attention: torch.Tensor, title: str = ""):
    """Figure with the image and, per head, the attention upsampled to the image and overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = attention.shape[0]
    rows, cols, _ = figure_layout(heads)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, squeeze=False
    )
    shown = image.permute(1, 2, 0).numpy()
    upsampled = torch.nn.functional.interpolate(attention[None], size=image.shape[-2:], mode="nearest")[0]
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(shown)
    axes.flat[0].set_title("image", fontsize=9)
    for h in range(heads):
        ax = axes.flat[h + 1]
        ax.imshow(shown)
        ax.imshow(upsampled[h].numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(f"head {h}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=8)
    # Room above the panels for their titles (and the figure title), fixed in inches.
    top = 1 - (0.5 if title else 0.3) / (rows * PANEL_INCHES)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.3)
    return fig


def load_image(path: str) -> torch.Tensor:
    """uint8 [3, H, W] from any file PIL reads."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass
class AttentionResult:
    out: str
    num_heads: int
    size: tuple[int, int]
    checkpoint: str
    step: int
    config_hash: str


def attention_figure(overrides: list[str] | tuple[str, ...]) -> AttentionResult:
    """`dinolab viz attention`: the newest complete (or named) checkpoint's teacher on one image."""
    cfg = compose_viz(overrides)
    backbone, patch_size, global_size, (path, step, config) = _backbone(cfg)
    size = cfg.image_size or global_size
    if size % patch_size:
        raise ConfigError(f"image_size={size} must be a multiple of model.patch_size={patch_size}")
    device = distributed.rank_device(cfg.device)
    backbone = backbone.to(device)
    raw = load_image(cfg.image)
    normed = eval_transform(size)(raw)
    attention = cls_attention(backbone, normed[None].to(device))[0].float().cpu()
    # The image as the network saw it, for display: undo the normalisation.
    from dino.method.augment import IMAGENET_MEAN, IMAGENET_STD

    shown = (
        normed * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    ).clamp(0, 1)
    title = f"{path} step {step} (config {config}): last block, CLS attention"
    fig = render(shown, attention, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    storage.atomic_write_bytes(cfg.out, buffer.getvalue())
    _, _, size_px = figure_layout(attention.shape[0])
    return AttentionResult(cfg.out, attention.shape[0], size_px, path, step, config)


def _backbone(cfg: VizConfig) -> tuple[nn.Module, int, int, tuple[str, int | None, str | None]]:
    """(teacher backbone, patch size, training crop size, (source, step, config hash)) of the checkpoint
    or weights file the config names."""
    if cfg.weights:
        from dino.io import weights

        loaded = weights.read(cfg.weights, cfg.weights_key)
        arch = loaded.architecture
        return weights.backbone_for(loaded), arch.patch_size, arch.img_size, (loaded.path, loaded.step, None)
    if cfg.checkpoint:
        ckpt = checkpoint.load(cfg.checkpoint)
    else:
        ckpt = checkpoint.load_latest(cfg.run.dir)
        if ckpt is None:
            raise CheckpointError(f"no complete checkpoint in {storage.join(cfg.run.dir, 'checkpoints')}")
    run_cfg = from_dict(ckpt.state["config"])
    source = (ckpt.path, ckpt.step, ckpt.marker.get("config_hash"))
    return teacher_backbone(ckpt.state, run_cfg), run_cfg.model.patch_size, run_cfg.crops.global_size, source
