"""DINO's multi-crop augmentation on a whole batch at once, on any device (GPU in training, CPU in tests).

CPU workers only decode; this module turns a batch of uint8 images of different sizes into the
2 global + N local crops with the reference's parameter distributions (see `dino.method.augment`):
random resized crop (scale, log-uniform aspect ratio 3/4..4/3, torchvision's 10 tries then centre
fallback), horizontal flip 0.5, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue
0.1, in a random order per image) with p 0.8, grayscale 0.2, Gaussian blur with a per-image sigma
(p 1.0 / 0.1 / 0.5 for global 1 / global 2 / local), solarisation (global 2, p 0.2), normalisation.

One batched op per stage: every crop of a size comes out of one `torchvision.ops.roi_align` call
(per-box sample index; adaptive sampling averages several bilinear samples per output pixel, so
down-scaling is anti-aliased), the blur is one grouped convolution with a kernel per image.
Parameters are drawn on the CPU from a `torch.Generator`, so a batch's crops depend only on the
generator's seed, not on the device, and `draw_params` exposes them for the statistical tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from dino.config.schema import CropsConfig
from dino.method.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_BLUR_SIGMA,
    REFERENCE_GLOBAL_SIZE,
    REFERENCE_LOCAL_SIZE,
)

RATIO = (3 / 4, 4 / 3)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5


@dataclass(frozen=True)
class CropKind:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    sigma: tuple[float, float]


def crop_kinds(crops: CropsConfig) -> list[CropKind]:
    """[global 1, global 2, local x num_local], with the blur sigma scaled to the crop size."""

    def sigma(size: int, reference: int) -> tuple[float, float]:
        return (REFERENCE_BLUR_SIGMA[0] * size / reference, REFERENCE_BLUR_SIGMA[1] * size / reference)

    g, loc = crops.global_size, crops.local_size
    g_sigma, l_sigma = sigma(g, REFERENCE_GLOBAL_SIZE), sigma(loc, REFERENCE_LOCAL_SIZE)
    kinds = [
        CropKind(g, tuple(crops.global_scale), 1.0, 0.0, g_sigma),
        CropKind(g, tuple(crops.global_scale), 0.1, 0.2, g_sigma),
    ]
    return kinds + [CropKind(loc, tuple(crops.local_scale), 0.5, 0.0, l_sigma)] * crops.num_local


@dataclass
class CropParams:
    """Per-image parameters of one crop kind (CPU tensors of length B)."""

    boxes: torch.Tensor  # [B, 4] x0, y0, x1, y1 in pixels
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    factors: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue
    order: torch.Tensor  # [B, 4] permutation of the 4 jitter ops
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # [B]
    solarize: torch.Tensor  # bool


def _uniform(n: int, low: float, high: float, gen: torch.Generator, shape: tuple = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand((n, *shape), generator=gen, dtype=torch.float64)


def _crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for every image at once (10 tries, then centre)."""
    n, tries = len(sizes), 10
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = height * width
    target = area * _uniform(n, scale[0], scale[1], gen, (tries,))
    log_ratio = _uniform(n, math.log(RATIO[0]), math.log(RATIO[1]), gen, (tries,))
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    top = torch.floor(_uniform(n, 0, 1, gen) * (height[:, 0] - h + 1))
    left = torch.floor(_uniform(n, 0, 1, gen) * (width[:, 0] - w + 1))
    # Fallback: the largest centre crop with the ratio clamped to the range.
    in_ratio = width[:, 0] / height[:, 0]
    fw = torch.where(
        in_ratio < RATIO[0],
        width[:, 0],
        torch.where(in_ratio > RATIO[1], torch.round(height[:, 0] * RATIO[1]), width[:, 0]),
    )
    fh = torch.where(in_ratio < RATIO[0], torch.round(width[:, 0] / RATIO[0]), height[:, 0])
    failed = first < 0
    w, h = torch.where(failed, fw, w), torch.where(failed, fh, h)
    top = torch.where(failed, torch.floor((height[:, 0] - h) / 2), top)
    left = torch.where(failed, torch.floor((width[:, 0] - w) / 2), left)
    return torch.stack([left, top, left + w, top + h], 1).float()


def draw_params(kind: CropKind, sizes: torch.Tensor, gen: torch.Generator) -> CropParams:
    """Every random choice for one crop kind of a batch whose images are `sizes` [B, 2] (H, W)."""
    n = len(sizes)
    boxes = _crop_boxes(sizes, kind.scale, gen)
    flip = torch.rand(n, generator=gen) < FLIP_P
    jitter = torch.rand(n, generator=gen) < JITTER_P
    b, c, s, h = JITTER["brightness"], JITTER["contrast"], JITTER["saturation"], JITTER["hue"]
    factors = torch.stack(
        [_uniform(n, 1 - b, 1 + b, gen), _uniform(n, 1 - c, 1 + c, gen), _uniform(n, 1 - s, 1 + s, gen),
         _uniform(n, -h, h, gen)], 1,
    ).float()  # fmt: skip
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    gray = torch.rand(n, generator=gen) < GRAY_P
    blur = torch.rand(n, generator=gen) < kind.blur_p
    sigma = _uniform(n, kind.sigma[0], kind.sigma[1], gen).float()
    solarize = torch.rand(n, generator=gen) < kind.solarize_p
    return CropParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solarize)


# --------------------------------------------------------------------------------------------------
# Batched image operations on float images in [0, 1], [B, 3, H, W]
# --------------------------------------------------------------------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)  # fmt: skip
    return table.gather(0, i[None, :, None].expand(1, -1, 3, *i.shape[1:]))[0]


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * f).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level
        mean = _gray(x)[:, :1].mean((2, 3), keepdim=True)
        return (f * x + (1 - f) * mean).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (f * x + (1 - f) * _gray(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.cat([(hsv[:, :1] + f) % 1.0, hsv[:, 1:]], 1)
    return _hsv_to_rgb(hsv)


def _color_jitter(x: torch.Tensor, p: CropParams, colour: torch.Tensor | None = None) -> torch.Tensor:
    """Each jittered image goes through its 4 ops in its own order: per (slot, op), the images whose
    slot holds that op. The masks are CPU tensors, so choosing the subsets never waits for the GPU,
    and every image is processed 4 times (not 16 full-batch passes). `colour` (CPU bool [B], optional)
    marks the images whose channels differ: saturation and hue leave a grey image grey and unchanged
    (hue exactly, saturation within 1e-4 of torchvision's blend with 0.9999·x), so grey images such as
    Fashion-MNIST's skip them — a third of the augmentation time on a CPU."""
    factors = p.factors.to(x.device)
    x = x.clone()
    for slot in range(4):
        for op in range(4):
            mask = p.jitter & (p.order[:, slot] == op)
            if op >= 2 and colour is not None:
                mask = mask & colour
            idx = torch.nonzero(mask)[:, 0]
            if len(idx):
                idx = idx.to(x.device)
                x[idx] = _jitter_op(x[idx], op, factors[idx, op])
    return x


def _blur(x: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, a kernel per image (one grouped conv per axis); reflect padding."""
    n, c, height, width = x.shape
    radius = math.ceil(3 * max_sigma)
    radius = min(radius, height - 1, width - 1)
    if radius < 1 or not blur.any():
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(blur.to(x.device).view(-1, 1), kernel, identity)
    weight = kernel.repeat_interleave(c, 0)  # [n * c, K]
    flat = x.reshape(1, n * c, height, width)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight.view(n * c, 1, 1, -1), groups=n * c
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight.view(n * c, 1, -1, 1), groups=n * c
    )
    return flat.view(n, c, height, width)


def apply_crop(
    images: torch.Tensor, kind: CropKind, p: CropParams, colour: torch.Tensor | None = None
) -> torch.Tensor:
    """float [B, 3, Hmax, Wmax] padded batch in [0, 1] -> normalised crops [B, 3, size, size].
    `colour`: see _color_jitter."""
    n, device = len(images), images.device
    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], p.boxes], 1).to(device, images.dtype)
    x = roi_align(images, rois, (kind.size, kind.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    x = torch.where(p.flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
    x = _color_jitter(x, p, colour)
    x = torch.where(p.gray.to(device).view(-1, 1, 1, 1), _gray(x), x)
    x = _blur(x, p.blur, p.sigma, kind.sigma[1])
    x = torch.where(p.solarize.to(device).view(-1, 1, 1, 1) & (x >= 128 / 255), 1.0 - x, x)
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3, H_i, W_i] images -> (uint8 [B, 3, Hmax, Wmax] zero-padded, sizes [B, 2])."""
    sizes = torch.tensor([img.shape[1:] for img in images])
    batch = torch.zeros(len(images), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), dtype=torch.uint8)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
    return batch, sizes


class BatchMultiCrop:
    """uint8 padded batch + sizes -> [global_1, global_2, local_1, ...], each [B, 3, S, S] float."""

    def __init__(self, crops: CropsConfig) -> None:
        self.kinds = crop_kinds(crops)

    def __call__(self, batch: torch.Tensor, sizes: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        images = batch.float().div_(255)
        # Which images have colour: only where the batch is on the CPU (on a GPU the answer would
        # cost a synchronisation per batch, and the jitter is cheap there anyway).
        colour = has_colour(batch) if batch.device.type == "cpu" else None
        return [apply_crop(images, kind, draw_params(kind, sizes, gen), colour) for kind in self.kinds]


def has_colour(batch: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> bool [B]: True where some pixel's channels differ (the image is not grey)."""
    return ((batch[:, 0] != batch[:, 1]) | (batch[:, 1] != batch[:, 2])).flatten(1).any(1)
