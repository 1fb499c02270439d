"""One place decides a rank's device (dino/io/distributed.py), and nothing else in the package picks a
GPU behind its back: on an 8-GPU node a bare `.cuda()` puts every rank on GPU 0."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dino.io import distributed

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dino", "launcher", "reports")


def device_bugs(source: str, filename: str = "<snippet>") -> list[str]:
    """Places that choose a CUDA device without the rank's index: `x.cuda(...)`,
    `torch.device("cuda")`, `.to("cuda")` and `device="cuda"` with a literal "cuda"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "cuda":
            found.append(f"{where}: .cuda()")
        literal_cuda = [a for a in node.args if isinstance(a, ast.Constant) and a.value == "cuda"]
        literal_cuda += [
            k.value for k in node.keywords if isinstance(k.value, ast.Constant) and k.value.value == "cuda"
        ]
        is_device = (
            isinstance(func, ast.Attribute) and func.attr == "device" or getattr(func, "id", "") == "device"
        )
        if literal_cuda and not (is_device and len(node.args) == 2):
            found.append(f"{where}: a device 'cuda' without an index")
    return found


def test_the_scanner_finds_each_kind_of_unindexed_device():
    snippet = """
x = y.cuda()
d = torch.device("cuda")
z = y.to("cuda")
w = torch.zeros(3, device="cuda")
ok = torch.device("cuda", local_rank)
fine = torch.cuda.is_available()
"""
    assert [b.split(": ", 1)[0] for b in device_bugs(snippet)] == [f"<snippet>:{n}" for n in (2, 3, 4, 5)]


def test_no_module_picks_a_gpu_without_the_ranks_index():
    bugs = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            bugs += device_bugs(path.read_text(), str(path.relative_to(REPO)))
    assert not bugs, "use dino.io.distributed's device (setup/rank_device/collective_device):\n" + "\n".join(
        bugs
    )


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with 4 GPUs and a recording torch.distributed: (calls, set the GPU count)."""
    calls: list[tuple] = []
    count = {"n": 4}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count["n"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda **kw: calls.append(("init_process_group", kw))
    )
    monkeypatch.setattr(distributed, "_device", None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    return calls, count


def test_local_rank_3_gets_cuda3_set_before_the_nccl_group_with_its_device_id(fake_gpus, monkeypatch):
    calls, _ = fake_gpus
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    info = distributed.setup("auto")
    assert calls == [
        ("set_device", torch.device("cuda", 3)),
        ("init_process_group", {"backend": "nccl", "device_id": torch.device("cuda", 3), "timeout": None}),
    ]
    assert info.device == distributed.device() == torch.device("cuda", 3)


def test_slurm_local_id_is_the_local_rank_when_nothing_exported_it(fake_gpus, monkeypatch):
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert distributed.rank_device("cuda") == torch.device("cuda", 2)


def test_a_task_that_sees_one_gpu_uses_it_and_too_few_gpus_is_a_clear_error(fake_gpus, monkeypatch):
    _, count = fake_gpus
    monkeypatch.setenv("LOCAL_RANK", "3")
    count["n"] = 1  # SLURM bound one GPU to this task
    assert distributed.rank_device("auto") == torch.device("cuda", 0)
    count["n"] = 2
    with pytest.raises(
        distributed.DeviceError, match="local rank 3 has no GPU of its own: 2 visible.*gpus_per_node"
    ):
        distributed.rank_device("auto")


def test_cpu_ranks_join_gloo_without_touching_a_gpu(fake_gpus, monkeypatch):
    calls, _ = fake_gpus
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup("cpu").device == torch.device("cpu")
    assert calls == [("init_process_group", {"backend": "gloo", "timeout": None})]


def test_torchruns_world_of_one_runs_the_nccl_path(fake_gpus, monkeypatch):
    calls, _ = fake_gpus
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    distributed.setup("auto")
    assert calls[1] == (
        "init_process_group",
        {"backend": "nccl", "device_id": torch.device("cuda", 0), "timeout": None},
    )


def test_one_process_joins_no_group_and_a_missing_gpu_is_named(fake_gpus, monkeypatch):
    calls, _ = fake_gpus
    distributed.setup("cuda")
    assert calls == [("set_device", torch.device("cuda", 0))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        distributed.DeviceError, match="device=cuda asks for a GPU but no CUDA device is visible"
    ):
        distributed.rank_device("cuda")
    assert distributed.rank_device("auto") == torch.device("cpu")
