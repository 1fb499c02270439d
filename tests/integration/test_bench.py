"""`dinolab bench` on CPU: every figure is produced, and the FLOP count scales with the batch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.integration.cli import REPO, TINY, dinolab, env


def _bench(*overrides: str) -> dict:
    result = dinolab("bench", *TINY, "train.workers=1", *overrides, "--warmup", "1", "--steps", "2", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.heavy
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


@pytest.mark.slow
@pytest.mark.heavy
def test_the_gpu_bench_script_runs_every_row_in_smoke_mode(tmp_path):
    """scripts/gpu_bench.py is what a (rare, 15-minute) GPU session runs: its plumbing — JPEG folder,
    every `dinolab bench` row, compiled included, the torchrun (DDP) row as 2 gloo processes,
    bench_augment, the table and the scaling line — is checked here on the CPU with the tiny ViT, so
    that session is not spent on a broken script."""
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_bench.py", "--smoke", "--out", str(tmp_path / "jpegs")],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| row |") :].splitlines()[2:]
    table = table[: next(i for i, line in enumerate([*table, ""]) if not line.startswith("| "))]
    labels = [line.split(" | ")[0].lstrip("| ") for line in table]
    assert labels == ["ViT-S/16 b64 synthetic", "ViT-S/16 b64 synthetic, compiled",
                      "ViT-S/16 b64 end to end (JPEG, GPU crops)", "ViT-S/16 b64 end to end (JPEG, CPU crops)",
                      "ViT-S/8 b32 synthetic", "ViT-S/16 b128 synthetic (MFU)",
                      "ViT-S/16 b64 synthetic, gloo x2 (smoke)"]  # fmt: skip
    for line in table:
        cells = line.split(" | ")
        assert float(cells[1].replace(",", "")) > 0, line  # synthetic img/s (per process for gloo x2)
        assert float(cells[2]) > 0 and float(cells[5]) >= 0, line  # ms/step, TFLOP/s (0.0x on a CPU)
        if "end to end" in cells[0]:
            assert float(cells[3].replace(",", "")) > 0 and float(cells[4].replace(",", "")) > 0, line
        else:
            assert cells[3] == cells[4] == "-", line
    # The DDP row: 2 processes really trained (their count read from the run's train.log), img/s per
    # process after the warm-up window, and its scaling against the single-process b64 row.
    ddp = json.loads(
        re.search(r"^ViT-S/16 b64 synthetic, gloo x2 \(smoke\): (\{.*\})$", proc.stdout, re.M)[1]
    )
    assert ddp["world_size"] == 2 and ddp["device"] == "cpu" and ddp["steps"] == "2 + 4", ddp
    assert ddp["img_per_s_per_gpu"] > 0 and ddp["img_per_s"] == pytest.approx(2 * ddp["img_per_s_per_gpu"])
    one = float(table[0].split(" | ")[1].replace(",", ""))
    scaling = re.search(r"^scaling x2: ([\d,.]+) img/s per GPU \(([\d,]+) in all\) / ([\d,.]+) img/s of one GPU "
                        r"\(ViT-S/16 b64 synthetic\) = (\d+\.\d\d)$", proc.stdout, re.M)  # fmt: skip
    assert scaling, proc.stdout[-2000:]
    per_gpu, _, single, ratio = (float(g.replace(",", "")) for g in scaling.groups())
    assert per_gpu == pytest.approx(ddp["img_per_s_per_gpu"], abs=0.06)
    assert single == pytest.approx(one, abs=0.6)
    assert ratio > 0 and ratio == pytest.approx(per_gpu / single, abs=0.006)
    assert "dinolab BatchMultiCrop (batched)" in proc.stdout and "torchvision.io.decode_jpeg" in proc.stdout
    assert len(list((tmp_path / "jpegs").rglob("*.jpg"))) == 96
