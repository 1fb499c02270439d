"""Encoders: images -> feature vectors, through timm's public ViT API only."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dino.config.schema import ConfigError
from dino.eval.evaluated import Evaluated


def cls_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS token after the final norm (what k-NN uses)."""
    return backbone.forward_features(images)[:, 0]


def multi_block_features(
    backbone: nn.Module, images: torch.Tensor, n_last: int, avgpool: bool
) -> torch.Tensor:
    """Concatenated CLS tokens of the last `n_last` blocks, each through the final norm, plus (with
    `avgpool`) the mean of the last block's normed patch tokens: the linear probe's input."""
    # indices=n: the last n blocks; NLC keeps tokens as a sequence; each item is (patches, prefix).
    outputs = backbone.forward_intermediates(
        images,
        indices=n_last,
        norm=True,
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=True,
    )
    feats = [prefix[:, 0] for _, prefix in outputs]
    if avgpool:
        feats.append(outputs[-1][0].mean(dim=1))
    return torch.cat(feats, dim=-1)


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


def build_encoder(
    target: Evaluated, kind: str, n_last: int = 1, avgpool: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """kind: cls (k-NN) or blocks (linear probe); the pixels baseline always flattens the image."""
    if target.backbone is None:
        return pixel_features
    backbone = target.backbone
    if kind == "cls":
        return lambda images: cls_features(backbone, images)
    depth = len(backbone.blocks)
    if n_last > depth:
        raise ConfigError(
            f"linear.n_last_blocks={n_last} exceeds the {depth} blocks of {target.run_cfg.model.name}"
        )
    return lambda images: multi_block_features(backbone, images, n_last, avgpool)
