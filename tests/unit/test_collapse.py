"""The collapse guard (dino/method/collapse.py) on hand-made metric windows, and its config keys."""

from __future__ import annotations

import math

import pytest

from dino.config.compose import compose
from dino.config.identity import config_hash, semantic_diff
from dino.config.schema import ConfigError, to_dict
from dino.method.collapse import ONE_DIM, UNIFORM, CollapseGuard, CollapseRule

K = 1024
LOG_K = math.log(K)
RULE = CollapseRule(
    K, warmup_steps=20, patience_steps=40, uniform_margin=0.02, one_dim_fraction=0.05, kl_flat=0.01
)
UNIFORM_WINDOW = (LOG_K - 0.005, 0.0002)
ONE_DIM_WINDOW = (0.01, 0.003)
HEALTHY_WINDOW = (4.2, 0.9)


def feed(windows: list[tuple[float, float]], rule: CollapseRule = RULE, every: int = 10):
    """(step, decision) of each window of `every` steps, starting at step 0."""
    guard = CollapseGuard(rule)
    return [(every * (i + 1), guard.update(every * (i + 1), e, kl)) for i, (e, kl) in enumerate(windows)]


def first_fire(windows, **kwargs):
    return next(((step, c) for step, c in feed(windows, **kwargs) if c is not None), (None, None))


def test_uniform_teacher_fires_after_patience_past_the_warmup():
    step, collapse = first_fire([UNIFORM_WINDOW] * 20)
    # windows starting at 20 (the warm-up's end) count: 20..60 is 40 steps of patience
    assert step == 60 and collapse.kind == UNIFORM and collapse.since == 20
    assert collapse.describe().startswith("uniform: entropy 6.926 >= ln K - 0.02 (6.911) for 40 steps")
    assert collapse.describe().endswith("kl 0.0002 <= 0.01")


def test_one_dimension_fires_after_patience():
    step, collapse = first_fire([HEALTHY_WINDOW] * 5 + [ONE_DIM_WINDOW] * 10)
    assert step == 90 and collapse.kind == ONE_DIM and collapse.since == 50
    assert collapse.describe().startswith("one dimension: entropy 0.010 < 0.05 ln K (0.347) for 40 steps")


def test_healthy_and_sharp_teachers_never_fire():
    """Low per-sample entropy alone is a sharp teacher, not a collapse: the KL is what tells."""
    sharp = (0.02, 0.8)  # entropy as low as a collapse's, but the student still has to predict
    near_uniform = (LOG_K - 0.005, 0.3)  # the student has not matched a flat teacher (yet)
    assert first_fire([HEALTHY_WINDOW, sharp, near_uniform] * 30) == (None, None)


def test_a_uniform_teacher_with_a_kl_plateau_fires_but_not_while_the_kl_still_moves():
    """A tiny student may never match a uniform teacher (KL stuck at ~1.8, docs/collapse.md): a KL
    within collapse_kl_range over the stretch is flat; one still falling is a student still learning."""
    plateau = [(LOG_K - 0.01, 1.8 + 0.02 * (i % 3)) for i in range(10)]
    step, collapse = first_fire(plateau)
    assert step == 60 and collapse.kind == UNIFORM
    assert collapse.describe().endswith("kl 1.8400 flat (1.8000-1.8400)")
    falling = [(LOG_K - 0.01, 1.8 - 0.04 * i) for i in range(20)]
    assert first_fire(falling) == (None, None)


def test_a_sharp_teacher_with_a_steady_kl_is_not_one_dimension():
    assert first_fire([(0.02, 0.8)] * 30) == (None, None)


def test_nothing_fires_during_the_warmup():
    rule = CollapseRule(K, 200, 40, 0.02, 0.05, 0.01)
    fired = [step for step, c in feed([UNIFORM_WINDOW] * 30, rule) if c is not None]
    assert fired[0] == 240  # 200 steps of warm-up ignored, then the full patience


def test_a_window_without_the_signal_starts_the_count_again():
    windows = [UNIFORM_WINDOW] * 5 + [HEALTHY_WINDOW] + [UNIFORM_WINDOW] * 5
    step, collapse = first_fire(windows)
    assert step == 100 and collapse.since == 60  # not 60, when the first streak would have fired


def test_switching_kind_starts_the_count_again():
    step, collapse = first_fire([UNIFORM_WINDOW] * 5 + [ONE_DIM_WINDOW] * 5)
    assert step == 90 and collapse.kind == ONE_DIM and collapse.since == 50  # uniform held 20..50 only


def test_non_finite_windows_are_no_signal():
    assert first_fire([(float("nan"), 0.0)] * 20) == (None, None)


def test_a_resumed_guard_counts_from_its_start_step():
    guard = CollapseGuard(RULE, start_step=100)
    assert [guard.update(s, *UNIFORM_WINDOW) is not None for s in (110, 120, 130, 140)] == [
        False,
        False,
        False,
        True,
    ]


def test_rule_reads_the_config_and_the_longest_warmup():
    cfg = compose(["model=vit_test", "optim.epochs=10", "optim.warmup_epochs=2", "teacher.warmup_temp_epochs=3",
                   "train.collapse_patience_steps=7", "head.out_dim=256"])  # fmt: skip
    rule = CollapseRule.from_config(
        cfg.train,
        cfg.head.out_dim,
        (cfg.optim.warmup_epochs, cfg.teacher.warmup_temp_epochs),
        steps_per_epoch=50,
    )
    assert (rule.out_dim, rule.warmup_steps, rule.patience_steps) == (256, 150, 7)


def test_collapse_keys_change_neither_the_run_id_nor_the_resume_check():
    base = compose(["model=vit_test"])
    changed = compose(["model=vit_test", "train.collapse_stop=false", "train.collapse_patience_steps=3",
                       "train.collapse_uniform_margin=0.5", "train.collapse_one_dim_fraction=0.2",
                       "train.collapse_kl_flat=0.1", "train.collapse_kl_range=1"])  # fmt: skip
    assert config_hash(changed) == config_hash(base)
    assert semantic_diff(to_dict(base), changed) == []
    old = to_dict(base)
    del old["train"]["collapse_stop"]  # a config.yaml written before the keys existed
    assert semantic_diff(old, base) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.collapse_patience_steps=-1", "train.collapse_patience_steps=-1 must be >= 0"),
        ("train.collapse_one_dim_fraction=1.5", "train.collapse_one_dim_fraction=1.5 must be in [0, 1)"),
    ],
)
def test_bad_collapse_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        compose(["model=vit_test", override])
