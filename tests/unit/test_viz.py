"""Attention maps: the recomputed attention is timm's, and the figure has one panel per head."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dino.config.schema import ConfigError
from dino.method.models import build_backbone
from dino.run.train import run
from dino.tools.viz import attention_figure, cls_attention, figure_layout, render
from tests.conftest import tiny_config


@pytest.mark.parametrize("name, heads", [("vit_test", 2), ("vit_tiny", 3)])
def test_recomputed_attention_equals_timms_explicit_attention(name, heads):
    torch.manual_seed(0)
    backbone = build_backbone(name, 8, 32).eval()
    images = torch.randn(2, 3, 32, 48)  # not square: the grid is 4 x 6
    ours = cls_attention(backbone, images)
    # timm's non-fused path materialises the attention and passes it through attn_drop.
    attn = backbone.blocks[-1].attn
    attn.fused_attn = False
    captured = {}
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out))
    with torch.no_grad():
        backbone.forward_features(images)
    hook.remove()
    expected = captured["a"][:, :, 0, 1:].reshape(2, heads, 4, 6)
    assert ours.shape == (2, heads, 4, 6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.sum((-1, -2)), 1 - captured["a"][:, :, 0, 0])


@pytest.mark.parametrize("heads, rows, cols", [(2, 1, 3), (3, 1, 4), (6, 2, 4), (12, 4, 4)])
def test_one_panel_per_head_plus_the_image(heads, rows, cols):
    assert figure_layout(heads)[:2] == (rows, cols)
    fig = render(torch.rand(3, 32, 32), torch.rand(heads, 4, 4), "title")
    with_images = [ax for ax in fig.axes if ax.images]
    assert len(with_images) == heads + 1
    assert [ax.get_title() for ax in with_images] == ["image", *[f"head {h}" for h in range(heads)]]
    assert all(len(ax.images) == 2 for ax in with_images[1:])  # image + attention overlay
    width, height = fig.get_size_inches() * fig.dpi
    assert (round(width), round(height)) == figure_layout(heads)[2]


@pytest.mark.slow
def test_attention_png_has_the_expected_size(tmp_path):
    run(tiny_config(tmp_path / "run"))
    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy()).save(image)
    out = tmp_path / "attn.png"
    result = attention_figure([f"run.dir={tmp_path / 'run'}", f"image={image}", f"out={out}", "device=cpu"])
    assert result.num_heads == 2 and result.step == 16
    with Image.open(out) as png:
        assert png.size == figure_layout(2)[2] == (750, 250)
    with pytest.raises(ConfigError, match="image=.*does not exist"):
        attention_figure([f"run.dir={tmp_path / 'run'}", f"image={tmp_path / 'nope.jpg'}"])
    with pytest.raises(ConfigError, match="unknown config key 'img'; did you mean image"):
        attention_figure([f"run.dir={tmp_path / 'run'}", "img=x.png"])


def test_attention_of_a_reference_weights_file(tmp_path):
    from tests.unit.test_weights import FIXTURES

    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(image)
    out = tmp_path / "attn.png"
    path = FIXTURES / "full_checkpoint.pth"
    result = attention_figure([f"weights={path}", f"image={image}", f"out={out}", "device=cpu"])
    assert (result.num_heads, result.checkpoint, result.step) == (2, str(path), 5)  # the reference's epoch
    with Image.open(out) as png:
        assert png.size == figure_layout(2)[2]
