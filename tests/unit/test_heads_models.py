import torch

from dino.method.models import DINOHead, build_student_teacher


def test_head_shapes_and_frozen_weight_g():
    head = DINOHead(64, out_dim=100, hidden_dim=32, bottleneck_dim=16, num_layers=3, norm_last_layer=True)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 100)
    weight_g = head.last_layer.parametrizations.weight.original0
    assert torch.all(weight_g == 1) and not weight_g.requires_grad
    # With unit weight_g the prototypes are unit vectors: the effective weight rows have norm 1.
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(100), atol=1e-5)


def test_head_weight_g_trainable_without_norm_last_layer():
    head = DINOHead(64, out_dim=10, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    assert head.last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_batches_each_resolution_once(tiny_cfg):
    cfg = tiny_cfg("crops.num_local=3")
    student, teacher = build_student_teacher(cfg.model, cfg.head, cfg.crops.global_size)
    calls = []
    student.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    crops = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 3
    out = student(crops)
    assert out.shape == (5 * 4, cfg.head.out_dim)
    assert calls == [(8, 3, 32, 32), (12, 3, 16, 16)]
    # The teacher starts as an exact copy and has no trainable parameters and no drop path.
    for (name, ps), pt in zip(student.named_parameters(), teacher.parameters(), strict=True):
        assert torch.equal(ps, pt), name
        assert not pt.requires_grad
    assert student.backbone.blocks[1].drop_path1.drop_prob > 0
    assert not hasattr(teacher.backbone.blocks[1].drop_path1, "drop_prob")
