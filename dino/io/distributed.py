"""torch.distributed from the job environment, and collectives that are no-ops in one process.

This module is the one place that decides a process's device. `setup(want)` reads the environment
torchrun or submitit set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; on SLURM submitit's
`TorchDistributedEnvironment` exports them), picks `cuda:LOCAL_RANK` (or the CPU), makes it the
current CUDA device *before* the process group starts, and hands it to `init_process_group` as
`device_id`. Every collective here then runs on that device. NCCL needs it: with a bare `.cuda()` or
an object collective on the default device, all ranks of a node land on GPU 0 and NCCL refuses
("Duplicate GPU detected") or hangs. `tests/unit/test_distributed.py` fails on any other `.cuda()`
or index-less `torch.device("cuda")` in the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

CPU = torch.device("cpu")
_device: torch.device | None = None  # set by setup(): this process's device


class DeviceError(RuntimeError):
    """The device a config asks for does not exist here; the message says what is visible."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default=CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def local_rank() -> int:
    """This process's index on its node: LOCAL_RANK (torchrun, submitit's export), else SLURM's."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def rank_device(want: str) -> torch.device:
    """The device of this process for a `device` setting (auto, cuda or cpu).

    A GPU is `cuda:LOCAL_RANK`: the usual SLURM/torchrun layout where every task of a node sees all
    of the node's GPUs. A task that sees exactly one GPU (SLURM binding one GPU per task, e.g.
    `--gpus-per-task=1`) uses it whatever its local rank.
    """
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        raise DeviceError(f"device={want} asks for a GPU but no CUDA device is visible")
    index, count = local_rank(), torch.cuda.device_count()
    if index < count:
        return torch.device("cuda", index)
    if count == 1:
        return torch.device("cuda", 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    raise DeviceError(
        f"local rank {index} has no GPU of its own: {count} visible (CUDA_VISIBLE_DEVICES={visible}); "
        "ask for as many GPUs per node (gpus_per_node) as tasks per node (tasks_per_node)"
    )


def launched_distributed() -> bool:
    """Whether a launcher asked for a process group: several processes, or torchrun's world of 1
    (WORLD_SIZE and MASTER_ADDR set), which then runs the NCCL code path on one GPU."""
    world = _env_int("WORLD_SIZE", default=1)
    return world > 1 or (world == 1 and os.environ.get("MASTER_ADDR", "") != "")


def group_timeout(hang_timeout_s: float) -> timedelta | None:
    """The process group's timeout for a `train.hang_timeout_s`: twice it, so the progress watchdog
    (dino/io/watchdog.py), which names the rank that stopped and writes stacks, acts first and the
    group's own timeout is the backstop; torch's default (None) when the watchdog is off."""
    return timedelta(seconds=2 * hang_timeout_s) if hang_timeout_s > 0 else None


def nccl_flight_recorder(trace_dir: str) -> None:
    """NCCL's flight recorder: the last collectives of every rank, dumped when a collective times
    out, into `trace_dir` (the run's health/ folder). Values already set in the environment win."""
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.makedirs(trace_dir, exist_ok=True)
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(trace_dir, "nccl-trace-rank"))


def setup(want: str, hang_timeout_s: float = 0.0, trace_dir: str = "") -> DistInfo:
    """Choose this process's device, make it current, then join the process group described by the
    environment (a plain single process initialises nothing). NCCL on GPUs, gloo on CPU; the group's
    timeout follows `hang_timeout_s` (`group_timeout`), NCCL's flight recorder writes into a local
    `trace_dir`. Safe to call again: a process already in a group keeps it."""
    global _device
    device = rank_device(want)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL binds its communicator to it
    _device = device
    if not is_initialized() and launched_distributed():
        timeout = group_timeout(hang_timeout_s)
        if device.type == "cuda":
            if trace_dir and "://" not in trace_dir:
                nccl_flight_recorder(trace_dir)
            dist.init_process_group(backend="nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return info()


def device() -> torch.device:
    """This process's device as `setup` chose it (the CPU before any setup)."""
    return _device or CPU


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo(device=device())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank(), device())


def collective_device() -> torch.device:
    """Where tensors of a collective must live: the rank's GPU under NCCL, the CPU under gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return device() if device().type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return CPU


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks, on the tensor's own device (moved to the collective's device
    and back, so a CPU tensor can be summed under NCCL)."""
    if not is_initialized():
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def any_true(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any rank (one small all-reduce; plain values in one process)."""
    if not is_initialized():
        return tuple(flags)
    tensor = torch.tensor([float(f) for f in flags], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in tensor.tolist())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in one process). Under NCCL the objects travel
    through the current CUDA device, which `setup` made this rank's own."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device().index or 0])
        else:
            dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
