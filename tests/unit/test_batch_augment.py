"""The batched multi-crop augmentation on CPU tensors: shapes and ranges, each operation against
torchvision's functional op, and the frequencies and ranges of every random parameter."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dino.config.schema import CropsConfig
from dino.method import batch_augment as ba
from dino.method.augment import IMAGENET_MEAN, IMAGENET_STD

CROPS = CropsConfig(global_size=32, local_size=16, num_local=3)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(40, 56), (64, 48), (28, 28), (33, 90), (100, 30), (48, 48)]
    return [
        torch.randint(0, 256, (3, *sizes[i % len(sizes)]), generator=gen, dtype=torch.uint8) for i in range(n)
    ]


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def test_crops_have_the_configured_sizes_and_value_range():
    batch, sizes = ba.pad_batch(_images(6))
    crops = ba.BatchMultiCrop(CROPS)(batch, sizes, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 3
    for c in crops:
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        pixels = _unnormalise(c)
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4


def test_same_seed_same_crops_other_seed_other_crops():
    batch, sizes = ba.pad_batch(_images(4))
    aug = ba.BatchMultiCrop(CROPS)
    a = aug(batch, sizes, torch.Generator().manual_seed(1))
    b = aug(batch, sizes, torch.Generator().manual_seed(1))
    c = aug(batch, sizes, torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def _params(n: int, **on) -> ba.CropParams:
    """All operations off (identity jitter factors) except those given."""
    off = torch.zeros(n, dtype=torch.bool)
    p = ba.CropParams(
        boxes=torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(n, 1), flip=off, jitter=off,
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1), order=torch.arange(4).repeat(n, 1),
        gray=off, blur=off, sigma=torch.ones(n), solarize=off,
    )  # fmt: skip
    for key, value in on.items():
        setattr(p, key, value)
    return p


KIND = ba.CropKind(32, (0.4, 1.0), 1.0, 0.0, (0.1, 1.5))


def _run(x: torch.Tensor, p: ba.CropParams) -> torch.Tensor:
    return _unnormalise(ba.apply_crop(x, KIND, p))


def test_each_operation_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    yes = torch.ones(4, dtype=torch.bool)
    tol = {"atol": 2e-5, "rtol": 0}
    # full-image box at the same size: the crop is the identity
    torch.testing.assert_close(_run(x, _params(4)), x, **tol)
    torch.testing.assert_close(_run(x, _params(4, flip=yes)), x.flip(-1), **tol)
    torch.testing.assert_close(_run(x, _params(4, gray=yes)), TF.rgb_to_grayscale(x, 3), **tol)
    torch.testing.assert_close(_run(x, _params(4, solarize=yes)), TF.solarize(x, 128 / 255), **tol)
    sigma = torch.tensor([0.3, 0.7, 1.1, 1.5])
    blurred = _run(x, _params(4, blur=yes, sigma=sigma))
    kernel = 2 * math.ceil(3 * KIND.sigma[1]) + 1
    for i in range(4):
        expected = TF.gaussian_blur(x[i : i + 1], [kernel, kernel], [float(sigma[i])] * 2)
        torch.testing.assert_close(blurred[i : i + 1], expected, **tol)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for op, (index, value) in zip(ops, [(0, 1.3), (1, 0.7), (2, 1.2), (3, 0.08)], strict=True):
        factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
        factors[:, index] = value
        got = _run(x, _params(4, jitter=yes, factors=factors))
        torch.testing.assert_close(got, op(x, value), atol=1e-4, rtol=0)


def test_jitter_applies_the_ops_in_each_images_own_order():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    yes = torch.ones(2, dtype=torch.bool)
    factors = torch.tensor([[1.4, 1.0, 1.0, 0.1]]).repeat(2, 1)
    order = torch.tensor([[0, 3, 1, 2], [3, 0, 1, 2]])  # brightness then hue / hue then brightness
    got = _run(x, _params(2, jitter=yes, factors=factors, order=order))
    torch.testing.assert_close(got[0], TF.adjust_hue(TF.adjust_brightness(x[0], 1.4), 0.1), atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], TF.adjust_brightness(TF.adjust_hue(x[1], 0.1), 1.4), atol=1e-4, rtol=0)


def test_grey_images_skip_saturation_and_hue_with_the_same_result():
    grey = [img[:1].expand(3, -1, -1).clone() for img in _images(3, seed=4)]
    batch, sizes = ba.pad_batch(grey + _images(3, seed=5))
    assert ba.has_colour(batch).tolist() == [False] * 3 + [True] * 3
    images = batch.float() / 255
    yes = torch.ones(6, dtype=torch.bool)
    factors = torch.tensor([[1.2, 0.8, 1.3, 0.07]]).repeat(6, 1)
    p = _params(6, jitter=yes, factors=factors)
    every_op = ba.apply_crop(images, KIND, p)
    skipped = ba.apply_crop(images, KIND, p, colour=ba.has_colour(batch))
    # grey images: saturation and hue are (near-)identities, so skipping them changes nothing
    torch.testing.assert_close(_unnormalise(skipped[:3]), _unnormalise(every_op[:3]), atol=1e-4, rtol=0)
    # colour images still get every op
    assert torch.equal(skipped[3:], every_op[3:])
    still = ba.apply_crop(
        images, KIND, _params(6, jitter=yes, factors=torch.tensor([[1.2, 0.8, 1.0, 0.0]]).repeat(6, 1))
    )
    assert (skipped[3:] - still[3:]).abs().max() > 0.01


def _bound(n: int, p: float) -> float:
    return 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize("kind_index", [0, 1, 2])
def test_parameter_frequencies_and_ranges_match_the_configuration(kind_index):
    kind = ba.crop_kinds(CROPS)[kind_index]
    n = 20_000
    gen = torch.Generator().manual_seed(kind_index)
    # photo-like shapes (aspect 0.8..1.25); far-off shapes make torchvision's tries fail more often and
    # fall back to a centre crop, as they do in the reference
    heights = torch.randint(60, 200, (n,), generator=gen)
    widths = (heights * (0.8 + 0.45 * torch.rand(n, generator=gen))).round().long()
    sizes = torch.stack([heights, widths], 1)
    p = ba.draw_params(kind, sizes, gen)

    w, h = p.boxes[:, 2] - p.boxes[:, 0], p.boxes[:, 3] - p.boxes[:, 1]
    assert (
        (p.boxes[:, :2] >= 0).all() and (p.boxes[:, 2] <= widths).all() and (p.boxes[:, 3] <= heights).all()
    )
    area = w * h / (heights * widths)
    ratio = w / h
    # rounding to whole pixels moves area and ratio slightly off the continuous bounds
    inside = (
        (area >= kind.scale[0] * 0.93) & (area <= kind.scale[1] * 1.07) & (ratio >= 0.7) & (ratio <= 1.43)
    )
    assert inside.float().mean() > 0.99
    log_ratio = torch.log(ratio[inside])
    assert abs(log_ratio.mean()) < 0.01  # log-uniform on [log 3/4, log 4/3]: symmetric about 0
    # the accepted boxes are not uniform in area (large boxes of a random ratio fail more often and are
    # redrawn): compare with torchvision's own sampler on the first 3,000 sizes
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(kind_index)
    ref_area, ref_ratio = [], []
    for hh, ww in sizes[:3000].tolist():
        _, _, rh, rw = RandomResizedCrop.get_params(torch.empty(1, hh, ww), list(kind.scale), [3 / 4, 4 / 3])
        ref_area.append(rh * rw / (hh * ww))
        ref_ratio.append(math.log(rw / rh))
    ref_area_t = torch.tensor(ref_area)
    assert abs(area.mean() - ref_area_t.mean()) < 4.5 * ref_area_t.std() / math.sqrt(3000)
    assert abs(torch.log(ratio).std() - torch.tensor(ref_ratio).std()) < 0.01

    for name, flags, expected in [
        ("flip", p.flip, ba.FLIP_P), ("jitter", p.jitter, ba.JITTER_P), ("gray", p.gray, ba.GRAY_P),
        ("blur", p.blur, kind.blur_p), ("solarize", p.solarize, kind.solarize_p),
    ]:  # fmt: skip
        assert abs(flags.float().mean() - expected) <= _bound(n, expected), name

    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        values = p.factors[:, column]
        assert values.min() >= low and values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.01 * (high - low) + 0.005
    assert p.sigma.min() >= kind.sigma[0] and p.sigma.max() <= kind.sigma[1]
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))
    first_op = torch.bincount(p.order[:, 0], minlength=4).float() / n
    assert (first_op - 0.25).abs().max() <= _bound(n, 0.25)
