"""Issue 7's GPU table in one call (< 8 minutes on one H100/H200): `dinolab bench` for every row.

    .venv/bin/python scripts/gpu_bench.py [--images 3000] [--quick] [--smoke]

Rows: ViT-S/16 2x224+10x96 K=65536 batch 64 on synthetic input (eager and train.compile=true), end
to end through the real loader on ImageNet-like JPEGs (500x375, generated here, 14 workers, crops on
the GPU), ViT-S/8 batch 32 synthetic, ViT-S/16 batch 128 for model FLOP utilisation, and the same
ViT-S/16 batch 64 per GPU trained by `torchrun --nproc_per_node=<every visible GPU> -m launcher.cli
train` on data=synthetic ("NCCL x<N> GPU(s)": NCCL DDP, a world of 1 on a one-GPU machine
still runs that code path): 10 warm-up + 30 measured steps
(--quick: 5 + 10) in windows of train.log_every, read back from the run's metrics.jsonl. Prints a
Markdown table (img/s per GPU, ms/step, TFLOP/s, MFU, peak memory) with the card and versions, the
scaling line (img/s per GPU of the torchrun row / img/s of the single-GPU b64 synthetic row: DDP's
cost plus the training loop's, as the synthetic images go through the loader and batched crops),
and scripts/bench_augment.py's decoder and augmentation-backend tables on the same card. Exits
non-zero when any row failed.

`--smoke` runs every row on the CPU with the tiny test ViT (32/16 px crops, 96 JPEGs, 2 workers,
2 steps; the torchrun row as 2 gloo processes, "gloo x2 (smoke)", 2 + 4 steps): the plumbing a GPU
session depends on, checked where there is no GPU (a CI test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
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


def ddp(label: str, overrides: list[str], world: int, log_every: int, windows: int) -> dict:
    """`torchrun --nproc_per_node=<world> -m launcher.cli train` on data=synthetic for 1 + `windows`
    metric windows of `log_every` steps; img/s per process from the run's metrics.jsonl, the first
    window left out (warm-up: CUDA/NCCL start, loader start, first allocations)."""
    batch = int(next(o for o in overrides if o.startswith("optim.batch_size=")).split("=")[1])
    max_steps = log_every * (1 + windows)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="dinolab-ddp-bench-") as tmp:
        run_dir, out = Path(tmp) / "run", Path(tmp) / "torchrun.log"
        train = ["data=synthetic", f"data.num_samples={batch * world * max_steps}", f"train.max_steps={max_steps}",
                 f"train.log_every={log_every}", "train.checkpoint_every_steps=0", "train.checkpoint_every_minutes=0",
                 "train.progress=false", "tracking.uri=", "monitor.knn_every_epochs=0", "monitor.knn_every_steps=0",
                 f"run.dir={run_dir}"]  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "launcher.cli", "train", *overrides, *train]  # fmt: skip
        with open(out, "w") as log:  # torchrun and its workers as one process group: a hang is ended whole
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                returncode = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                returncode = "timeout (300 s)"
        metrics, train_log = run_dir / "metrics.jsonl", run_dir / "train.log"
        lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        found = re.search(
            r" on (\S+), (\d+) process\(es\)", train_log.read_text() if train_log.exists() else ""
        )
        timed = [m for m in lines if m["step"] > log_every]
        error = (
            f"torchrun exited {returncode}" if returncode != 0
            else "no process count in train.log" if found is None
            else f"{found[2]} process(es) trained, not {world}" if int(found[2]) != world
            else f"{len(timed)} metric windows after the warm-up, not {windows}" if len(timed) != windows
            else None
        )  # fmt: skip
        if error:
            print(f"{label}: FAILED ({error})\n{out.read_text()[-3000:]}", flush=True)
            return {"label": label, "error": error}
    # metrics.jsonl's img_per_s is rank 0's: its steps x optim.batch_size (per process) over the
    # window's seconds. The windows have as many steps each: their images / their seconds is the
    # harmonic mean of their rates.
    per_gpu = len(timed) / sum(1 / m["img_per_s"] for m in timed)
    result = {"label": label, "world_size": int(found[2]), "device": found[1], "img_per_s_per_gpu": per_gpu,
              "img_per_s": per_gpu * world, "step_ms": 1e3 * batch / per_gpu,
              "warmup_s": log_every * batch / lines[0]["img_per_s"], "peak_memory_gib": lines[-1]["memory_gib"],
              "steps": f"{log_every} + {log_every * windows}", "wall_s": time.time() - start}  # fmt: skip
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
    # DDP: every visible GPU (2 gloo processes on the CPU in --smoke), the b64 recipe per process.
    import torch

    world = 2 if args.smoke else torch.cuda.device_count()
    label = "ViT-S/16 b64 synthetic, " + ("gloo x2 (smoke)" if args.smoke else f"NCCL x{world} GPU(s)")
    log_every, windows = (2, 2) if args.smoke else (5, 2) if args.quick else (10, 3)
    ddp_workers = "train.workers=0" if args.smoke else "train.workers=4"  # smoke: 2 processes, 2 cores
    if world:
        ddp_row = ddp(label, [*model, "optim.batch_size=64", ddp_workers, "data.augment_device=gpu"], world,
                      log_every, windows)  # fmt: skip
    else:
        ddp_row = {"label": "ViT-S/16 b64 synthetic, NCCL", "error": "no CUDA device visible"}
    rows.append(ddp_row)
    # Decoders and augmentation backends (dinolab vs kornia, when installed) on the same card.
    augment_args = ["--device", device] + (["--batch", "4", "--images", "8"] if args.smoke else [])
    augment = subprocess.run([sys.executable, "scripts/bench_augment.py", *augment_args], cwd=REPO,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    print(augment.stdout if augment.returncode == 0 else f"bench_augment failed:\n{augment.stderr[-2000:]}")
    import timm

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
        if r is ddp_row:  # TFLOP/s and MFU per GPU from the single-GPU b64 row's FLOPs per step
            flops, peak = rows[0].get("flops_per_step"), rows[0].get("peak_tflops")
            tflops = flops / (r["step_ms"] / 1e3) / 1e12 if flops else None
            print(f"| {r['label']} | {r['img_per_s_per_gpu']:,.0f} | {r['step_ms']:.1f} | - | - | "
                  + (f"{tflops:.2f}" if tflops else "-") + " | "
                  + (f"{100 * tflops / peak:.1f} %" if tflops and peak else "-")
                  + f" | {r['peak_memory_gib']:.1f} | {r['warmup_s']:.1f} |")  # fmt: skip
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        e2e, alone = (f"{r[k]:,.0f}" if r[k] else "-" for k in ("end_to_end_img_per_s", "loader_img_per_s"))
        print(f"| {r['label']} | {r['synthetic_img_per_s']:,.0f} | {r['synthetic_step_ms']:.1f} | {e2e} | "
              f"{alone} | {r['tflops']:.2f} | {mfu} | {r['peak_memory_gib']:.1f} | {r['warmup_s']:.1f} |")  # fmt: skip
    print(f"\n{ddp_row['label']}: `dinolab train` under torchrun on data=synthetic (images generated by the "
          "loader, crops batched on the device, DDP), img/s and ms/step per GPU after a "
          "warm-up window (its seconds under warm-up s), peak GiB of rank 0, TFLOP/s and MFU from the b64 "
          "row's FLOPs per step.")  # fmt: skip
    if "error" in ddp_row or "error" in rows[0]:
        print(f"scaling: - ({'the DDP row' if 'error' in ddp_row else rows[0]['label']} failed)")
    else:
        r, one = ddp_row, rows[0]["synthetic_img_per_s"]
        print(f"scaling x{r['world_size']}: {r['img_per_s_per_gpu']:,.1f} img/s per GPU ({r['img_per_s']:,.0f} in all) "
              f"/ {one:,.1f} img/s of one GPU ({rows[0]['label']}) = {r['img_per_s_per_gpu'] / one:.2f}")  # fmt: skip
    failed = [r["label"] for r in rows if "error" in r] + (["bench_augment"] if augment.returncode else [])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
