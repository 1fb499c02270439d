"""Benchmark (not a test): JPEG decoders and multi-crop augmentation backends, for issue 7's choice.

    .venv/bin/python scripts/bench_augment.py [--device cpu|cuda] [--batch 64] [--images 256] [--json]

Decoders (one process, 500x375 JPEGs generated here): PIL, PIL in draft mode with the shorter side
capped at 256 (`data.max_decode_size=256`, what dinolab's loader does), torchvision.io.decode_jpeg
(libjpeg-turbo; also on the GPU with --device cuda), simplejpeg (if installed).

Augmentation (2x224 + 10x96 crops of a uint8 batch on --device): dinolab's `BatchMultiCrop`,
kornia's per-sample `AugmentationSequential` with the same operations and probabilities (if
installed), and torchvision's per-image v2 pipeline (`MultiCropAugment`, what CPU workers run).
kornia needs equal-size inputs, so every image here is 500x375; dinolab's path also takes a padded
batch of different sizes (real datasets).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino.config.schema import CropsConfig  # noqa: E402
from dino.data.datasets import decode_image  # noqa: E402
from dino.method.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment  # noqa: E402
from dino.method.batch_augment import BatchMultiCrop, crop_kinds  # noqa: E402


def synthetic_jpeg(seed: int, size: tuple[int, int] = (500, 375)) -> bytes:
    """An ImageNet-like JPEG (smooth colour blobs plus grain; ~75 kB at 500x375), seeded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    noise = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)) // 2 + noise
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_jpegs(n: int) -> list[bytes]:
    return [synthetic_jpeg(i) for i in range(n)]


def rate(fn, items: int, repeat: int = 3) -> float:
    """Items per second of the best of `repeat` timed calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return items / best


def decoders(jpegs: list[bytes], device: torch.device) -> dict[str, float]:
    from torchvision.io import decode_jpeg

    raw = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    results = {
        "PIL (full size)": rate(lambda: [decode_image(j) for j in jpegs], len(jpegs)),
        "PIL draft, shorter side <= 256": rate(lambda: [decode_image(j, 256) for j in jpegs], len(jpegs)),
        "torchvision.io.decode_jpeg (CPU)": rate(lambda: [decode_jpeg(r) for r in raw], len(jpegs)),
    }
    if device.type == "cuda":
        results["torchvision.io.decode_jpeg (GPU, batched)"] = rate(
            lambda: decode_jpeg(raw, device=device), len(jpegs)
        )
    try:
        import simplejpeg

        results["simplejpeg"] = rate(lambda: [simplejpeg.decode_jpeg(j) for j in jpegs], len(jpegs))
        results["simplejpeg, shorter side >= 256 (DCT scaling)"] = rate(
            lambda: [simplejpeg.decode_jpeg(j, min_height=256, min_width=256) for j in jpegs], len(jpegs)
        )
    except ImportError:
        results["simplejpeg"] = float("nan")
    return results


def kornia_pipelines(crops: CropsConfig, device: torch.device):
    import kornia.augmentation as K

    pipes = []
    for kind in crop_kinds(crops):
        radius = int(np.ceil(3 * kind.sigma[1]))
        ops = [
            K.RandomResizedCrop((kind.size, kind.size), scale=kind.scale, ratio=(3 / 4, 4 / 3)),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((2 * radius + 1, 2 * radius + 1), kind.sigma, p=kind.blur_p),
        ]
        if kind.solarize_p:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=kind.solarize_p))
        ops.append(K.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)))
        pipes.append(K.AugmentationSequential(*ops).to(device))
    return pipes


def augmenters(jpegs: list[bytes], batch: int, device: torch.device) -> dict[str, float]:
    crops = CropsConfig()
    images = [decode_image(j) for j in jpegs[:batch]]
    uint8 = torch.stack(images).to(device)
    sizes = torch.tensor([img.shape[1:] for img in images])
    ours = BatchMultiCrop(crops)
    gen = torch.Generator().manual_seed(0)
    results = {"dinolab BatchMultiCrop (batched)": rate(lambda: ours(uint8, sizes, gen), batch)}
    try:
        pipes = kornia_pipelines(crops, device)
        results["kornia AugmentationSequential (batched)"] = rate(
            lambda: [pipe(uint8.float() / 255) for pipe in pipes], batch
        )
    except ImportError:
        results["kornia AugmentationSequential (batched)"] = float("nan")
    if device.type == "cpu":
        per_image = MultiCropAugment(crops)
        few = images[: max(4, batch // 8)]
        results["torchvision v2 per image (one CPU worker)"] = rate(
            lambda: [per_image(img) for img in few], len(few), repeat=1
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    jpegs = make_jpegs(max(args.images, args.batch))
    figures = {"decode (img/s, one process)": decoders(jpegs, device)}
    figures[f"2x224 + 10x96 crops on {device.type} (img/s, batch {args.batch})"] = augmenters(
        jpegs, args.batch, device
    )
    if args.json:
        print(json.dumps(figures))
        return
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{name}; torch {torch.__version__}")
    for section, rows in figures.items():
        print(f"\n| {section} | img/s |\n|---|---|")
        for label, value in rows.items():
            print(f"| {label} | {'not installed' if value != value else f'{value:,.0f}'} |")


if __name__ == "__main__":
    main()
