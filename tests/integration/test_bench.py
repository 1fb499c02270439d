"""`dinolab bench` on CPU: every figure is produced, and the FLOP count scales with the batch."""

from __future__ import annotations

import json

from tests.integration.cli import TINY, dinolab


def _bench(*overrides: str) -> dict:
    result = dinolab("bench", *TINY, "train.workers=1", *overrides, "--warmup", "1", "--steps", "2", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_reports_every_figure_and_counts_flops_per_image():
    small, large = _bench("optim.batch_size=4"), _bench("optim.batch_size=8")
    for r in (small, large):
        assert r["device"] == "cpu" and r["synthetic_img_per_s"] > 0 and r["synthetic_step_ms"] > 0
        assert r["loader_img_per_s"] > 0 and r["end_to_end_img_per_s"] > 0 and r["end_to_end_fraction"] > 0
        assert r["flops_per_step"] > 0 and r["tflops"] > 0 and r["peak_memory_gib"] > 0
        assert r["mfu"] is None  # no known peak for a CPU
    ratio = large["flops_per_step"] / small["flops_per_step"]
    assert 1.9 < ratio < 2.1, ratio  # the counter sees the whole step: FLOPs grow with the batch


def test_bench_table_names_its_rows():
    result = dinolab(
        "bench", *TINY, "train.workers=0", "--warmup", "0", "--steps", "1", "--input", "synthetic"
    )
    assert result.returncode == 0, result.stderr
    for row in ("synthetic input", "FLOPs per step", "achieved", "peak memory"):
        assert row in result.stdout
    assert "loader alone" not in result.stdout
