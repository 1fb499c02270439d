"""Weights in: files written by the reference DINO code itself (tests/fixtures/reference-dino, see its
README.json: a ViT 64 wide, 2 blocks, 2 heads, patch 8, 32 px) loaded into our timm backbone and head
give the reference teacher's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino.io import weights
from dino.method.models import DINOHead
from dino.tools.viz import last_block_attention

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference-dino"
EXPECTED = torch.load(FIXTURES / "expected_outputs.pt", weights_only=True)
FILES = ["backbone_pretrain.pth", "full_checkpoint.pth"]


def last_blocks(backbone: torch.nn.Module, images: torch.Tensor, n: int) -> torch.Tensor:
    """The reference's get_intermediate_layers(x, n): each of the last n blocks' tokens after the
    final norm, CLS first, stacked."""
    layers = backbone.get_intermediate_layers(images, n=n, norm=True, return_prefix_tokens=True)
    return torch.stack([torch.cat([prefix, patches], dim=1) for patches, prefix in layers])


@pytest.mark.parametrize("name", FILES)
def test_reference_files_give_the_reference_teachers_features_and_attention(name):
    loaded = weights.read(str(FIXTURES / name))
    assert loaded.architecture == weights.Architecture(64, 2, 8, 32)
    backbone = weights.backbone_for(loaded)  # the architecture read from the tensors: vit_test, patch 8
    x = EXPECTED["x32"]
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), EXPECTED["cls_32"], atol=1e-5, rtol=0)
        torch.testing.assert_close(last_blocks(backbone, x, 2), EXPECTED["last4_32"], atol=1e-5, rtol=0)
    torch.testing.assert_close(last_block_attention(backbone, x), EXPECTED["attn_32"], atol=1e-5, rtol=0)


def test_at_48_px_timm_and_the_reference_interpolate_position_embeddings_differently():
    """Measured, not matched: timm resamples the position grid to exactly 6x6 (bicubic), the reference
    scales it by (6 + 0.1) / 4. The CLS features differ by ~2.6e-3 at most (norms ~8): documented in
    the README's "Weights in and out"."""
    backbone = weights.backbone_for(weights.read(str(FIXTURES / "backbone_pretrain.pth")))
    with torch.no_grad():
        difference = (backbone(EXPECTED["x48"]) - EXPECTED["cls_48"]).abs().max().item()
    print(f"max |timm - reference| of CLS features at 48 px: {difference:.2e}")
    assert 1e-5 < difference < 1e-2


def test_the_full_checkpoint_holds_teacher_and_student_with_their_heads():
    path = str(FIXTURES / "full_checkpoint.pth")
    teacher = weights.read(path)
    assert teacher.format == "reference checkpoint" and teacher.step == 5
    assert teacher.info["args"]["momentum_teacher"] == 0.996  # the argparse.Namespace, read safely
    head = weights.load_head(teacher, DINOHead(64, 256, 128, 32, 3, norm_last_layer=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(head(EXPECTED["cls_32"]), EXPECTED["head_32"], atol=1e-5, rtol=0)
    student = weights.read(path, key="student")  # DDP's module. prefix removed
    assert student.backbone.keys() == teacher.backbone.keys()
    assert student.identity != teacher.identity
    assert not torch.equal(student.backbone["norm.weight"], teacher.backbone["norm.weight"])


def test_a_file_that_does_not_fit_names_the_keys_and_the_architecture_it_looks_like(tmp_path):
    loaded = weights.read(str(FIXTURES / "backbone_pretrain.pth"))
    with pytest.raises(weights.WeightsError) as err:
        weights.backbone_for(loaded, "vit_small", 16)
    message = str(err.value)
    assert "does not fit model=vit_small model.patch_size=16" in message
    assert "shape mismatch: cls_token (1, 1, 64) in the file, (1, 1, 384) in the model" in message
    assert "missing: blocks.2.norm1.weight" in message
    assert message.endswith(
        "The file looks like: embed dim 64, depth 2, patch 8, 32 px (model=vit_test model.patch_size=8)"
    )
    partial = {k: v for k, v in loaded.backbone.items() if k != "norm.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(weights.WeightsError, match="missing: norm.bias"):
        weights.backbone_for(weights.read(str(tmp_path / "partial.pth")))


class Payload:
    """Any class: unpickling it would run code of the file's choosing."""


def test_arbitrary_pickles_are_refused_not_executed(tmp_path):
    torch.save({"cls_token": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(weights.WeightsError, match="weights_only=True.*never arbitrary pickled objects"):
        weights.read(str(tmp_path / "evil.pth"))
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.read(str(tmp_path / "missing.pth"))


def test_train_init_weights_starts_both_networks_from_the_reference_checkpoint(tiny_cfg):
    from dino.config.identity import config_hash
    from dino.run.build import build_state

    # model=vit_test is the fixture's architecture: 64 wide, 2 blocks, patch 8, head 128/32/256.
    cfg = tiny_cfg(f"train.init_weights={FIXTURES / 'full_checkpoint.pth'}")
    state = build_state(cfg, torch.device("cpu"))
    student, teacher = state.student, state.teacher
    with torch.no_grad():
        for net in (student.eval(), teacher):
            features = net.backbone(EXPECTED["x32"])
            torch.testing.assert_close(features, EXPECTED["cls_32"], atol=1e-5, rtol=0)
            torch.testing.assert_close(net.head(features), EXPECTED["head_32"], atol=1e-5, rtol=0)
    assert config_hash(cfg) != config_hash(tiny_cfg())  # another start, another run
    # A backbone-only file: its backbone, a fresh head.
    cfg = tiny_cfg(f"train.init_weights={FIXTURES / 'backbone_pretrain.pth'}")
    teacher = build_state(cfg, torch.device("cpu")).teacher
    with torch.no_grad():
        torch.testing.assert_close(teacher.backbone(EXPECTED["x32"]), EXPECTED["cls_32"], atol=1e-5, rtol=0)
    with pytest.raises(weights.WeightsError, match="does not fit model=vit_test model.patch_size=16"):
        wrong = tiny_cfg("model.patch_size=16", f"train.init_weights={FIXTURES / 'backbone_pretrain.pth'}")
        build_state(wrong, torch.device("cpu"))


def test_a_timm_checkpoint_with_a_classifier_loads_without_it(tmp_path):
    import timm

    classifier = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, embed_dim=64, depth=2, num_heads=2,
        patch_size=8, img_size=32,
    ).eval()  # fmt: skip
    torch.save({"state_dict": classifier.state_dict()}, tmp_path / "timm_train_checkpoint.pth")
    loaded = weights.read(str(tmp_path / "timm_train_checkpoint.pth"))
    assert loaded.format == "backbone state dict" and not any(k.startswith("head.") for k in loaded.backbone)
    backbone = weights.backbone_for(loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(x), classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        )
