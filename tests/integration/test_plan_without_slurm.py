"""`dinolab sweep plan` on a machine without SLURM (a laptop, CI): the real command in a subprocess
whose PATH holds no `sbatch` or `srun`, whatever this machine has installed. Every shipped sweep
plans (cost and sbatch preview, exit 0, no traceback, nothing created); `submit --executor slurm`
refuses in one line and creates nothing; and the preview is byte for byte what `submit` hands to
sbatch (a fake `sbatch` that keeps the script)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_OVERRIDES
from tests.integration.cli import DINOLAB, REPO, env

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
USER = "dinolab-no-slurm-test"


def no_slurm_env(bin_dir: Path, cache: Path) -> dict[str, str]:
    """The environment of a machine without SLURM: PATH is the interpreter's own folder (the venv's
    bin, where `dinolab` lives) and `bin_dir`; USER set (the shipped roots use ${USER})."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    e = env()
    e.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), str(bin_dir)]), USER=USER,
             HOME=str(cache.parent), XDG_CACHE_HOME=str(cache))  # fmt: skip
    return e


def dinolab(cwd: Path, environ: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DINOLAB, *args], capture_output=True, text=True, env=environ, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def flop_cache(tmp_path_factory):
    """One FLOP cache for the module: the shipped sweeps share shapes (ViT-S/16 at 2x224 + 10x96)."""
    return tmp_path_factory.mktemp("home") / "cache"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_plans_without_slurm(path, tmp_path, flop_cache):
    environ = no_slurm_env(tmp_path / "bin", flop_cache)
    for tool in ("sbatch", "srun", "squeue"):
        assert shutil.which(tool, path=environ["PATH"]) is None
    cwd = tmp_path / "cwd"  # quickstart's root is relative: it would be here
    cwd.mkdir()

    plan = dinolab(cwd, environ, "sweep", "plan", str(path))

    out = plan.stdout + plan.stderr
    assert plan.returncode == 0, out
    assert "Traceback" not in out and "srun" not in plan.stderr, out
    assert "sbatch script: pretrain array" in plan.stdout
    assert "#!/bin/bash" in plan.stdout and "#SBATCH --array=0-" in plan.stdout
    assert "export SUBMITIT_EXECUTOR=slurm" in plan.stdout
    (cost,) = [line for line in plan.stdout.splitlines() if line.startswith("cost: ")]
    assert "unknown cost" not in cost, out  # ImageNet priced by data.num_images where it is not mounted
    # A plan creates nothing: no run folder, record, manifest or MLflow store.
    assert not any(cwd.iterdir()) and not Path(f"/checkpoint/{USER}").exists()


def test_submit_with_the_slurm_executor_refuses_in_one_line_without_slurm(tmp_path):
    root = tmp_path / "root"
    environ = no_slurm_env(tmp_path / "bin", tmp_path / "cache")
    for verb in ("submit", "run"):
        sub = dinolab(tmp_path, environ, "sweep", verb, str(REPO / "sweeps" / "quickstart.yaml"),
                      f"root={root}", "--executor", "slurm")  # fmt: skip
        assert sub.returncode == 2, sub.stdout + sub.stderr
        assert sub.stderr.splitlines() == [
            "dinolab sweep: error: sbatch and srun not found on PATH: --executor slurm needs a SLURM login "
            "node; use --executor local to run here, or `dinolab sweep plan` to see the sbatch scripts"
        ]
        assert not root.exists()  # no run folder, record.json, jobs.json, manifest or MLflow store


FAKE_SBATCH = """#!/bin/sh
# Keeps the script it is given, answers like sbatch.
PATH=/usr/bin:/bin
n=$(ls "{keep}" | wc -l)
cp "$1" "{keep}/$n.sh"
echo "Submitted batch job $((4200 + n))"
"""


@pytest.mark.parametrize("only_one", [False, True], ids=["array", "one-job"])
def test_the_preview_is_what_submit_hands_to_sbatch(tmp_path, only_one):
    """The preview renders without submitit's SLURM executor (no srun probe); this checks it against
    the script the real executor writes, byte for byte: a job array of 2 runs with its chained k-NN
    array, and one run (`--run`), which submitit submits as a single job, not an array."""
    keep, bin_dir = tmp_path / "sbatch-got", tmp_path / "bin"
    keep.mkdir()
    environ = no_slurm_env(bin_dir, tmp_path / "cache")
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.replace("{keep}", str(keep)))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit will not build its executor without
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    sweep = tmp_path / "fake.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "fake", "root": str(tmp_path / "root"), "base": list(TINY_OVERRIDES),
        "grid": {"optim.batch_size": [8, 4]}, "evals": ["knn"], "tracking_uri": "none",
        "resources": {"pretrain": {"partition": "p", "additional": {"comment": "x y"}, "setup": ["echo hi"]},
                      "knn": {"cpus_per_task": 3}},
    }))  # fmt: skip
    select = ["--run", "batch_size8"] if only_one else []

    plan = dinolab(tmp_path, environ, "sweep", "plan", str(sweep), *select)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    previews = re.split(r"─+ sbatch script: \w+ array ─+\n", plan.stdout)[1:]
    sub = dinolab(tmp_path, environ, "sweep", "submit", str(sweep), *select, "--executor", "slurm")
    assert sub.returncode == 0, sub.stdout + sub.stderr

    sent = [(keep / f"{i}.sh").read_text() for i in range(len(list(keep.iterdir())))]
    assert len(sent) == len(previews) == 2  # pretrain, then knn
    # plan writes no code snapshot: it names the folder submit makes, with a placeholder for its hash.
    (code,) = (tmp_path / "root" / "fake" / "code").iterdir()
    pretrain, knn = (
        p.removesuffix("\n").replace("<code hash>", code.name) for p in previews
    )  # print() adds a newline
    assert f"export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}" in sent[0].splitlines()
    assert pretrain == sent[0]
    assert knn.replace("'aftercorr:<pretrain array job id>'", "aftercorr:4200") == sent[1]
    assert ("#SBATCH --array=" in sent[0]) is not only_one
    assert "#SBATCH --comment='x y'" in sent[0] and "#SBATCH --dependency=aftercorr:4200" in sent[1]
