"""Issue 7's GPU table in one call (< 8 minutes on one H100/H200): `dinolab bench` for every row.

    .venv/bin/python scripts/gpu_bench.py [--images 3000] [--quick] [--smoke]

Rows: ViT-S/16 2x224+10x96 K=65536 batch 64 on synthetic input (eager and train.compile=true), end
to end through the real loader on ImageNet-like JPEGs (500x375, generated here, 14 workers, crops on
the GPU), ViT-S/8 batch 32 synthetic, ViT-S/16 batch 128 for model FLOP utilisation. Prints a
Markdown table (img/s per GPU, ms/step, TFLOP/s, MFU, peak memory) with the card and versions, and
scripts/bench_augment.py's decoder and augmentation-backend tables on the same card.

`--smoke` runs every row on the CPU with the tiny test ViT (32/16 px crops, 96 JPEGs, 2 workers,
2 steps): the plumbing a GPU session depends on, checked where there is no GPU (a CI test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIT_S = ["model=vit_small", "crops.global_size=224", "crops.local_size=96", "crops.num_local=10",
         "head.out_dim=65536", "train.precision=bf16", "train.device=cuda"]  # fmt: skip
# --smoke: the same rows, shrunk to run in seconds on a CPU (model.patch_size=8 stays valid at 32 px).
SMOKE = ["model=vit_test", "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
         "head.out_dim=256", "train.precision=fp32", "train.device=cpu"]  # fmt: skip


def _jpeg(args: tuple[Path, int]) -> None:
    from bench_augment import synthetic_jpeg  # scripts/ is on sys.path: this file is run as a script

    folder, i = args
    (folder / f"class{i % 10}" / f"{i:06d}.jpg").write_bytes(synthetic_jpeg(i))


def make_images(root: Path, n: int) -> None:
    if (root / "done").exists():
        return
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_jpeg, [(root, i) for i in range(n)], chunksize=64))
    (root / "done").touch()


def bench(label: str, overrides: list[str], steps: int, warmup: int, inputs: str) -> dict:
    cmd = [sys.executable, "-m", "launcher.cli", "bench", *overrides, "--steps", str(steps),
           "--warmup", str(warmup), "--input", inputs, "--json"]  # fmt: skip
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print(f"{label}: FAILED\n{proc.stderr[-2000:]}", flush=True)
        return {"label": label, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    result = json.loads(proc.stdout) | {"label": label, "wall_s": time.time() - start}
    print(f"{label}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument(
        "--smoke", action="store_true", help="every row on the CPU with a tiny ViT (a plumbing check)"
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/dinolab-jpegs"), help="where the JPEGs are made")
    args = p.parse_args()
    steps, warmup = (5, 2) if args.quick else (30, 10)
    model, workers, device = VIT_S, 14, "cuda"
    if args.smoke:
        steps, warmup, model, workers, device, args.images = 2, 1, SMOKE, 2, "cpu", min(args.images, 96)
    images = args.out
    start = time.time()
    make_images(images, args.images)
    print(f"{args.images} JPEGs 500x375 in {time.time() - start:.0f} s", flush=True)
    loader = ["data=imagefolder", f"data.root={images}", f"train.workers={workers}", "data.augment_device=gpu"]  # fmt: skip
    rows = [
        bench("ViT-S/16 b64 synthetic", [*model, "optim.batch_size=64"], steps, warmup, "synthetic"),
        bench(
            "ViT-S/16 b64 synthetic, compiled",
            [*model, "optim.batch_size=64", "train.compile=true"],
            steps,
            warmup,
            "synthetic",
        ),  # fmt: skip
        bench(
            "ViT-S/16 b64 end to end (JPEG, GPU crops)",
            [*model, "optim.batch_size=64", *loader],
            steps,
            warmup,
            "both",
        ),  # fmt: skip
        bench(
            "ViT-S/16 b64 end to end (JPEG, CPU crops)",
            [*model, "optim.batch_size=64", *loader[:-1], "data.augment_device=cpu"],
            steps,
            warmup,
            "both",
        ),
        bench(
            "ViT-S/8 b32 synthetic",
            [*model, "model.patch_size=8", "optim.batch_size=32"],
            steps,
            warmup,
            "synthetic",
        ),  # fmt: skip
        bench("ViT-S/16 b128 synthetic (MFU)", [*model, "optim.batch_size=128"], steps, warmup, "synthetic"),
    ]
    # Decoders and augmentation backends (dinolab vs kornia, when installed) on the same card.
    augment_args = ["--device", device] + (["--batch", "4", "--images", "8"] if args.smoke else [])
    augment = subprocess.run([sys.executable, "scripts/bench_augment.py", *augment_args], cwd=REPO,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    print(augment.stdout if augment.returncode == 0 else f"bench_augment failed:\n{augment.stderr[-2000:]}")
    import timm
    import torch

    print(f"\ncard: {rows[0].get('device', '?')}; torch {torch.__version__}, timm {timm.__version__}; "
          f"{time.time() - start:.0f} s in all\n")  # fmt: skip
    print(
        "| row | synthetic img/s | ms/step | end to end img/s | loader img/s | TFLOP/s | MFU | peak GiB | warm-up s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error'][:80]} |||||||")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        e2e, alone = (f"{r[k]:,.0f}" if r[k] else "-" for k in ("end_to_end_img_per_s", "loader_img_per_s"))
        print(f"| {r['label']} | {r['synthetic_img_per_s']:,.0f} | {r['synthetic_step_ms']:.1f} | {e2e} | "
              f"{alone} | {r['tflops']:.2f} | {mfu} | {r['peak_memory_gib']:.1f} | {r['warmup_s']:.1f} |")  # fmt: skip
    failed = [r["label"] for r in rows if "error" in r] + (["bench_augment"] if augment.returncode else [])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
