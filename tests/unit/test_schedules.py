import numpy as np

from dino.method.schedules import build_schedules, cosine_schedule, teacher_temp_schedule


def test_cosine_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10)
    assert len(s) == 100
    assert s[0] == 0.0 and abs(s[9] - 1.0) < 1e-12 and s[10] == 1.0
    assert np.all(np.diff(s[10:]) <= 0) and abs(s[-1] - 0.1) < 1e-3


def test_teacher_temp_warms_linearly_then_stays():
    s = teacher_temp_schedule(0.04, 0.07, total_steps=50, warmup_steps=10)
    assert s[0] == 0.04 and abs(s[9] - 0.07) < 1e-12 and np.all(s[10:] == 0.07)


def test_build_schedules_follows_the_recipe(tiny_cfg):
    cfg = tiny_cfg(
        "optim.epochs=10", "optim.warmup_epochs=2", "teacher.warmup_temp=0.02", "teacher.warmup_temp_epochs=3"
    )
    sch = build_schedules(cfg.optim, cfg.teacher, steps_per_epoch=5, world_size=4)
    assert sch.total_steps == 50
    peak = 0.0005 * 8 * 4 / 256  # lr per 256 images x global batch
    assert abs(sch.lr[10] - peak) < 1e-15 and sch.lr[0] == 0.0
    assert abs(sch.lr[-1] - 1e-6) < 1e-6
    assert abs(sch.weight_decay[0] - 0.04) < 1e-12 and abs(sch.weight_decay[-1] - 0.4) < 1e-3
    assert abs(sch.momentum[0] - 0.996) < 1e-12 and abs(sch.momentum[-1] - 1.0) < 1e-5
    assert sch.teacher_temp[0] == 0.02 and abs(sch.teacher_temp[-1] - 0.04) < 1e-12
    assert sch.freeze_last_layer_steps == 5
