"""Backbones from timm and the multi-crop wrapper that runs each crop size through them once.

The DINO projection head (`DINOHead`): MLP -> L2-normalised bottleneck -> weight-normalised prototypes.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dino.config.schema import ARCHS, HeadConfig, ModelConfig


def build_backbone(name: str, patch_size: int, img_size: int, drop_path: float = 0.0) -> nn.Module:
    """A timm ViT with no classifier that accepts any input size divisible by the patch size.

    `dynamic_img_size` interpolates the position embeddings, so 224 px global and 96 px local crops
    share one backbone. Weights are random (no hub access at start).
    """
    timm_name, shape = ARCHS[name]
    return timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        patch_size=patch_size,
        img_size=img_size,
        dynamic_img_size=True,
        drop_path_rate=drop_path,
        **shape,
    )


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops; crops of one resolution are batched together."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


def build_student_teacher(
    model: ModelConfig, head_cfg: HeadConfig, img_size: int
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (without), the teacher a copy of the student's weights;
    `img_size` is the global crops' side (crops.global_size)."""
    nets = []
    for drop_path in (model.drop_path, 0.0):
        backbone = build_backbone(model.name, model.patch_size, img_size, drop_path)
        head = DINOHead(
            backbone.num_features,
            head_cfg.out_dim,
            head_cfg.hidden_dim,
            head_cfg.bottleneck_dim,
            head_cfg.num_layers,
            head_cfg.norm_last_layer,
        )
        nets.append(MultiCropWrapper(backbone, head))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict(), strict=True)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


# ---- the DINO projection head -----------------------------------------------------------------------
class DINOHead(nn.Module):
    """Linear(d, hidden)-GELU-...-Linear(hidden, bottleneck) -> L2 norm -> WeightNorm Linear(bottleneck, K).

    With `norm_last_layer` the weight norm (weight_g) is fixed to 1 and frozen, so the prototypes are
    unit vectors and only their direction is learnt, as in the reference.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        num_layers = max(num_layers, 1)
        if num_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        weight_g = self.last_layer.parametrizations.weight.original0
        weight_g.data.fill_(1.0)
        if norm_last_layer:
            weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
