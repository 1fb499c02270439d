"""Benchmark (not a test): reading small images one object per image vs. the same images as webdataset
shards, from a real S3-compatible server (moto_server on 127.0.0.1, started here) and from local disk.

    .venv/bin/python scripts/bench_data.py --images 4000 [--size 64] [--shard-size 500]

Prints images/s for: listing + reading + decoding every image of an image folder, and reading +
decoding the same images from shards (`dinolab data pack`), each in one process, in pack order.
moto answers from memory on the same machine, so the per-request cost here (~ms) is a lower bound of
a real object store's; the gap only grows with real network latency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino.data import shards
from dino.data.datasets import ImageFolder  # noqa: E402
from dino.io import storage  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402


def make_folder(root: Path, images: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(smooth).resize((size, size), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:06d}.jpg", quality=90)


def read_all(dataset, label: str, rows: list, list_s: float = 0.0) -> None:
    start = time.monotonic()
    for i in range(len(dataset)):
        dataset[i]
    elapsed = time.monotonic() - start + list_s
    rows.append((label, len(dataset), list_s, elapsed, len(dataset) / elapsed))
    print(f"  {label}: {len(dataset) / elapsed:,.0f} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64, help="side of the JPEGs")
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dinolab-bench-data-"))
    local_folder = work / "folder"
    make_folder(local_folder, args.images, args.size)
    mean_kb = sum(p.stat().st_size for p in local_folder.rglob("*.jpg")) / args.images / 1e3
    print(f"{args.images} JPEGs of {args.size} px ({mean_kb:.1f} kB each) in {local_folder}")

    server = S3Server(work / "s3").start()
    os.environ.update(server.env)
    try:
        bucket = server.make_bucket("bench")
        start = time.monotonic()
        for path in sorted(local_folder.rglob("*.jpg")):
            storage.atomic_write_bytes(f"{bucket}/folder/{path.parent.name}/{path.name}", path.read_bytes())
        print(f"uploaded the folder in {time.monotonic() - start:.0f} s")
        rows: list = []
        for where, root in (("local", str(work)), ("s3", bucket)):
            start = time.monotonic()
            folder = ImageFolder(storage.join(root, "folder"))
            list_s = time.monotonic() - start
            read_all(folder, f"{where} image folder (1 object per image)", rows, list_s)
            shards.pack(folder, storage.join(root, "shards"), args.shard_size, classes=folder.classes)
            read_all(
                shards.ShardedDataset(storage.join(root, "shards")),
                f"{where} shards ({args.shard_size}/shard)",
                rows,
            )
    finally:
        server.stop()
    print()
    print("| source | images | listing s | total s | images/s |")
    print("|---|---:|---:|---:|---:|")
    for label, n, list_s, total, rate in rows:
        print(f"| {label} | {n} | {list_s:.2f} | {total:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
