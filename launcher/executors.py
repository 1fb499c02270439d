"""submitit executors per stage: `local` (embedded default), `slurm`, `debug` (in-process)."""

from __future__ import annotations

import shlex
import shutil
from typing import Any

import submitit

from launcher.code_snapshot import PLACEHOLDER, snapshots_folder
from launcher.errors import UserError
from launcher.sweep_file import Resources, Sweep

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


def pythonpath_setup(code_dir: str) -> list[str]:
    """The job's last setup lines: the sweep's code snapshot (launcher/code_snapshot.py) first on
    PYTHONPATH, so the job and every requeue import dinolab from it, not from the working tree (the
    editable install's finder comes after PYTHONPATH). PYTHONSAFEPATH too: submitit starts the job
    with `python -m submitit.core._submit`, and `-m` puts the current folder before PYTHONPATH; a job
    starts in the folder it was submitted from, often the checkout, whose `launcher/` would win.
    Last, so a stage's own `setup` that sets PYTHONPATH keeps its entries after the snapshot rather
    than dropping it."""
    head, tail = code_dir.rsplit("/", 1)  # the hash (or plan's placeholder) stays unquoted: readable
    return [
        "export PYTHONSAFEPATH=1",
        f"export PYTHONPATH={shlex.quote(head)}/{tail}${{PYTHONPATH:+:$PYTHONPATH}}",
    ]


def executor_parameters(
    res: Resources, executor: str, name: str, parallelism: int, code_dir: str = ""
) -> dict[str, Any]:
    """submitit parameters for one stage; SLURM-only keys are passed only to SLURM. `code_dir`: the
    snapshot the jobs import (empty: the code this process imports, as for a test's executor)."""
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
    setup = [*thread_setup(res), *res.setup, *(pythonpath_setup(code_dir) if code_dir else [])]
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


def require_slurm() -> None:
    """Refuse `--executor slurm` where SLURM's client is missing, before anything is created: submitit
    submits with `sbatch` and will not build its SLURM executor without `srun` on PATH."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} not found on PATH: --executor slurm needs a SLURM login node; "
            "use --executor local to run here, or `dinolab sweep plan` to see the sbatch scripts"
        )


def build_executor(
    sweep: Sweep, stage: str, executor: str, folder: str, code_dir: str = ""
) -> submitit.AutoExecutor:
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if executor == "slurm":
        require_slurm()
    ex = submitit.AutoExecutor(folder=folder, cluster=executor, slurm_max_num_timeout=sweep.max_timeouts)
    res = sweep.stage_resources(stage)
    ex.update_parameters(
        **executor_parameters(res, executor, f"{sweep.name}-{stage}", sweep.array_parallelism, code_dir)
    )
    return ex


class _ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor that only renders scripts: everything as in SlurmExecutor but the
    "is srun on PATH?" probe its constructor makes (through `affinity`), so `plan` works anywhere."""

    @classmethod
    def affinity(cls) -> int:
        return 2  # what SlurmExecutor says where srun exists; nothing is ever submitted from here


def sbatch_preview(sweep: Sweep, stage: str, folder: str, array_size: int, dependency: str = "") -> str:
    """The sbatch script of this stage's job array as `submit` hands it to sbatch (for `plan`: no
    SLURM, no srun, no cluster needed).

    `submit` builds `AutoExecutor(cluster="slurm")`, which translates `executor_parameters` into the
    SlurmExecutor's own (generic keys renamed by `_convert_parameters`, `slurm_<key>` passed as
    `<key>`), then submits an array of N > 1 jobs with `map_count=N` (one job without), rendered by
    `_make_submission_file_text(_submitit_command_str)`. The same steps here, on a SlurmExecutor
    subclass that skips the srun probe: submitit renders scripts only while submitting, so this
    reaches its private `_convert_parameters`, `_submitit_command_str` and
    `_make_submission_file_text` (the launcher's one use of submitit's private API).
    `tests/integration/test_plan_without_slurm.py` checks the result against what a (fake) sbatch
    receives from `sweep submit`, byte for byte, but for the code snapshot's hash: `plan` writes no
    snapshot and shows `<code hash>` in its folder's name (launcher/code_snapshot.py)."""
    res = sweep.stage_resources(stage)
    code_dir = f"{snapshots_folder(sweep)}/{PLACEHOLDER}"
    params = executor_parameters(res, "slurm", f"{sweep.name}-{stage}", sweep.array_parallelism, code_dir)
    if dependency:  # the stage's own extra sbatch options plus the dependency, as submission.py passes them
        params["slurm_additional_parameters"] = dict(res.additional, dependency=dependency)
    ex = _ScriptOnlySlurmExecutor(folder, max_num_timeout=sweep.max_timeouts)
    prefix = "slurm_"
    generic = {k: v for k, v in params.items() if not k.startswith(prefix) and v is not None}
    specific = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix) and v is not None}
    ex.update_parameters(**ex._convert_parameters(generic), **specific)
    if array_size > 1:
        ex.parameters["map_count"] = array_size
    return ex._make_submission_file_text(ex._submitit_command_str, "<uid>")
