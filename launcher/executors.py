"""submitit executors per stage: `local` (embedded default), `slurm`, `debug` (in-process)."""

from __future__ import annotations

from typing import Any

import submitit

from launcher.sweep import Resources, Sweep

EXECUTORS = ("local", "slurm", "debug")


def thread_setup(res: Resources) -> list[str]:
    """The job's first setup line: as many intra-op threads as CPUs the job asked for.

    Torch's default is a thread per core of the machine. Jobs sharing a machine (the local executor
    always; SLURM where tasks are not bound to their CPUs) then oversubscribe it, and OpenMP's spinning
    threads make that catastrophic: two 2-thread runs on 2 cores trained at 13.5 img/s each instead of
    370. An OMP_NUM_THREADS already set (in the environment, or by the stage's own `setup`, which runs
    after this line) wins.
    """
    return [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{res.cpus_per_task}}}"]


def executor_parameters(res: Resources, executor: str, name: str, parallelism: int) -> dict[str, Any]:
    """submitit parameters for one stage; SLURM-only keys are passed only to SLURM."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": res.timeout_min,
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "mem_gb": res.mem_gb,
    }
    if res.gpus_per_node:  # asking for 0 GPUs fails on clusters without GRES
        params["gpus_per_node"] = res.gpus_per_node
    setup = [*thread_setup(res), *res.setup]
    if executor == "slurm":
        params["slurm_array_parallelism"] = parallelism
        params["slurm_signal_delay_s"] = res.signal_delay_s
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
        if res.additional:
            params["slurm_additional_parameters"] = dict(res.additional)
        params["slurm_setup"] = setup
    if executor == "local":
        params["local_setup"] = setup
    return params


def build_executor(sweep: Sweep, stage: str, executor: str, folder: str) -> submitit.AutoExecutor:
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    ex = submitit.AutoExecutor(folder=folder, cluster=executor, slurm_max_num_timeout=sweep.max_timeouts)
    res = sweep.stage_resources(stage)
    ex.update_parameters(
        **executor_parameters(res, executor, f"{sweep.name}-{stage}", sweep.array_parallelism)
    )
    return ex


def sbatch_preview(sweep: Sweep, stage: str, folder: str, array_size: int, dependency: str = "") -> str:
    """The sbatch script of this stage's job array as SLURM would get it (for `plan`; no cluster needed).

    The one use of submitit's private API in the launcher: submitit renders the script only while
    submitting, so the array size (`map_count`), the command and the rendering are reached through
    the SLURM executor inside the AutoExecutor (`ex._executor`), as submitit itself does."""
    ex = build_executor(sweep, stage, "slurm", folder)
    if dependency:  # the stage's own extra sbatch options (what build_executor passed) plus the dependency
        extra = dict(sweep.stage_resources(stage).additional, dependency=dependency)
        ex.update_parameters(slurm_additional_parameters=extra)
    slurm = ex._executor
    slurm.parameters["map_count"] = array_size
    command = " ".join(slurm._submitit_command_str.split())
    return slurm._make_submission_file_text(command, "<uid>")
