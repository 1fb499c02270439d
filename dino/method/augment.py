"""Multi-crop augmentation of DINO on uint8 image tensors (torchvision transforms v2, CPU).

The parameters are the reference's (ANCHORS.md). The Gaussian blur's sigma, given for 224 px global
and 96 px local crops, is scaled in proportion to the crop size so small images (Fashion-MNIST at
32/16 px) are blurred as much, relative to their size, as ImageNet crops are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from dino.config.schema import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_GLOBAL_SIZE = 224
REFERENCE_LOCAL_SIZE = 96
REFERENCE_BLUR_SIGMA = (0.1, 2.0)


def _blur(size: int, reference_size: int, p: float) -> v2.Transform:
    scale = size / reference_size
    sigma = (REFERENCE_BLUR_SIGMA[0] * scale, REFERENCE_BLUR_SIGMA[1] * scale)
    kernel = max(3, 2 * math.ceil(3 * sigma[1]) + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=sigma)], p=p)


def _crop_pipeline(
    size: int, scale: tuple[float, float], reference_size: int, blur_p: float, solarize_p: float
) -> v2.Compose:
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        _blur(size, reference_size, blur_p),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class MultiCropAugment:
    """uint8 [3, H, W] image -> [global_1, global_2, local_1, ..., local_N] float crops.

    global_1: blur p=1.0; global_2: blur p=0.1 and solarize p=0.2; locals: blur p=0.5. Every crop:
    bicubic RandomResizedCrop, flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2.
    Randomness comes from torch's global generator; `sample_seed` + `torch.random.fork_rng` make it a
    function of (seed, epoch, index) alone.
    """

    def __init__(self, crops: CropsConfig) -> None:
        g, loc = crops.global_size, crops.local_size
        self.global_1 = _crop_pipeline(
            g, crops.global_scale, REFERENCE_GLOBAL_SIZE, blur_p=1.0, solarize_p=0.0
        )
        self.global_2 = _crop_pipeline(
            g, crops.global_scale, REFERENCE_GLOBAL_SIZE, blur_p=0.1, solarize_p=0.2
        )
        self.local = _crop_pipeline(loc, crops.local_scale, REFERENCE_LOCAL_SIZE, blur_p=0.5, solarize_p=0.0)
        self.num_local = crops.num_local

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        crops = [self.global_1(image), self.global_2(image)]
        crops += [self.local(image) for _ in range(self.num_local)]
        return crops


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch."""
    return int(
        np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> 1
    )
