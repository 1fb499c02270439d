"""Time dinolab's training step on one GPU with synthetic crops (no loader), for the issue notes.

    python scripts/gpu_check.py --model vit_small --patch 16 --batch 64 --num-local 10 --steps 20

Prints img/s per GPU, step time and peak memory. `dinolab bench` (issue 7) will replace this.
"""

from __future__ import annotations

import argparse
import time

import torch

from dino.config import compose
from dino.loss import DINOLoss
from dino.models import build_student_teacher
from dino.schedules import build_schedules
from dino.step import StepState, build_optimizer, train_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_small")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-local", type=int, default=10)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    cfg = compose([f"model={a.model}", f"model.patch_size={a.patch}", f"crops.num_local={a.num_local}",
                   f"optim.batch_size={a.batch}", f"train.precision={a.precision}"])  # fmt: skip
    dev = torch.device("cuda")
    torch.manual_seed(0)
    student, teacher = (m.to(dev) for m in build_student_teacher(cfg))
    state = StepState(
        student, student, teacher, DINOLoss(cfg.head.out_dim, 2 + a.num_local).to(dev),
        build_optimizer(student, "cuda"), torch.amp.GradScaler("cuda", enabled=a.precision == "fp16"),
        build_schedules(cfg, 1000, 1), "cuda", a.precision, cfg.optim.clip_grad,
    )  # fmt: skip
    g, loc = cfg.crops.global_size, cfg.crops.local_size
    crops = [torch.randn(a.batch, 3, g, g, device=dev) for _ in range(2)]
    crops += [torch.randn(a.batch, 3, loc, loc, device=dev) for _ in range(a.num_local)]
    for i in range(a.warmup):
        train_step(state, crops, 2000 + i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        out = train_step(state, crops, 3000 + i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    print(
        f"{a.model}/{a.patch} batch {a.batch} 2x{g}+{a.num_local}x{loc} {a.precision}: "
        f"{a.batch / dt:.0f} img/s, {dt * 1000:.1f} ms/step, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
        f"loss {out['loss'].item():.3f} on {torch.cuda.get_device_name()}"
    )


if __name__ == "__main__":
    main()
