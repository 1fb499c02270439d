"""Backbones from timm and the multi-crop wrapper that runs each crop size through them once."""

from __future__ import annotations

import timm
import torch
from torch import nn

from dino.config.schema import ARCHS, HeadConfig, ModelConfig
from dino.method.heads import DINOHead


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
