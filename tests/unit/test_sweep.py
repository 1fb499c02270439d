"""Sweep files: every shipped file plans, grid expansion and run ids, errors that name file and key."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from launcher.executors import sbatch_preview
from launcher.plan import submitit_folder
from launcher.sweep import SweepError, expand, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
GOLDEN = REPO / "tests" / "golden" / "patch_size.pretrain.sbatch"


def write_sweep(tmp_path: Path, **content) -> Path:
    base = {
        "name": "t",
        "root": str(tmp_path / "root"),
        "base": ["model=vit_test"],
        "grid": {"model.patch_size": [8, 4]},
    }
    base.update(content)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_plans(path, tmp_path):
    sweep = load_sweep(path, [f"root={tmp_path}"])
    runs = expand(sweep)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    for run in runs:
        assert run.run_dir == f"{tmp_path}/{sweep.name}/{run.name}-{run.run_id}"
        assert run.config.run.dir == run.run_dir


def test_shipped_sweeps_cover_the_papers_ablations():
    names = {p.stem for p in SWEEPS}
    assert {"patch_size", "momentum", "multicrop", "quickstart"} <= names
    multicrop = expand(load_sweep(REPO / "sweeps" / "multicrop.yaml", ["root=/r"]))
    assert [r.config.crops.num_local for r in multicrop] == [0, 2, 6, 10]


def test_grid_times_zip_times_seeds_and_stable_ids(tmp_path):
    path = write_sweep(tmp_path, zip={"crops.num_local": [2, 4], "optim.batch_size": [8, 6]}, seeds=[0, 1],
                       short_names={"model.patch_size": "ps", "crops.num_local": "nl", "optim.batch_size": "bs"})  # fmt: skip
    runs = expand(load_sweep(path))
    assert len(runs) == 2 * 2 * 2
    assert runs[0].name == "ps8-nl2-bs8-s0"
    assert {(r.config.crops.num_local, r.config.optim.batch_size) for r in runs} == {(2, 8), (4, 6)}
    # Same config -> same id, whatever the root or tracking URI; another seed -> another id.
    again = expand(load_sweep(path, [f"root={tmp_path / 'elsewhere'}", "tracking_uri=http://x"]))
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert runs[0].run_id != runs[1].run_id


@pytest.mark.parametrize(
    "content, message",
    [
        ({"gird": {"model.patch_size": [8]}}, "unknown key 'gird' (did you mean grid?)"),
        (
            {"grid": {"model.pach_size": [8]}},
            "grid.model.pach_size names no config key (did you mean model.patch_size?)",
        ),
        ({"base": ["model=vit_smal"]}, "model/vit_smal"),
        ({"base": ["optim.epohcs=3"]}, "unknown config key 'optim.epohcs'; did you mean optim.epochs?"),
        (
            {"resources": {"pretrain": {"partiton": "gpu"}}},
            "unknown key 'resources.pretrain.partiton' (did you mean partition?)",
        ),
        ({"evals": ["knnn"]}, "unknown evaluation 'knnn' (did you mean knn?)"),
        (
            {"eval_overrides": {"linaer": ["linear.epochs=1"]}},
            "eval_overrides.linaer: unknown evaluation (did you mean linear?)",
        ),
        ({"zip": {"crops.num_local": [2, 4], "optim.batch_size": [8]}}, "must have the same length"),
        ({"grid": {"train.workers": [1, 2]}}, "two runs have the same config"),
        (
            {"resources": {"knn": {"nodes": 2, "tasks_per_node": 8, "gpus_per_node": 4}}},
            "resources.knn: tasks_per_node=8 > gpus_per_node=4",
        ),
    ],
)
def test_sweep_errors_name_the_file_and_the_key(tmp_path, content, message):
    path = write_sweep(tmp_path, **content)
    with pytest.raises(SweepError) as err:
        expand(load_sweep(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_command_line_edits_of_the_evaluations():
    """`evals=[]` drops the evaluations; `eval_overrides.knn=[...]` appends to that stage's list."""
    path = REPO / "sweeps" / "quickstart.yaml"
    sweep = load_sweep(
        path, ["eval_overrides.knn=[knn.max_train=64,'knn.k=[5]']", "eval_overrides.linear=[linear.epochs=1]"]
    )
    assert sweep.evals == ["knn"] and sweep.eval_overrides == {
        "knn": ["knn.max_test=1000", "knn.max_train=64", "knn.k=[5]"],
        "linear": ["linear.epochs=1"],
    }
    assert load_sweep(path, ["evals=[]"]).evals == []
    with pytest.raises(SweepError, match="quote items that hold brackets"):
        load_sweep(path, ["eval_overrides.knn=[knn.max_train=64,knn.k=[5]]"])
    with pytest.raises(SweepError, match="eval_overrides.knnn: unknown evaluation"):
        load_sweep(path, ["eval_overrides.knnn=knn.max_test=5"])


def test_sbatch_script_matches_the_golden_file():
    sweep = load_sweep(REPO / "sweeps" / "patch_size.yaml", ["root=/sweeps"])
    text = sbatch_preview(sweep, "pretrain", submitit_folder(sweep), len(expand(sweep)))
    text = text.replace(sys.executable, "<python>")
    if os.environ.get("DINOLAB_UPDATE_GOLDEN"):  # regenerate deliberately, review the diff, commit
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2", "#SBATCH --signal=USR2@180"):  # fmt: skip
        assert line in text


def test_status_shows_an_error_with_brackets_as_text(tmp_path):
    """A rank that died takes the others down with gloo's '[/…/pair.cc:561] Connection closed by
    peer': rich read that as a closing markup tag and `sweep status` crashed (MarkupError)."""
    from rich.console import Console

    from launcher import records
    from launcher.status import status_table

    sweep = load_sweep(write_sweep(tmp_path, grid={"model.patch_size": [8]}))
    (run,) = expand(sweep)
    error = "RuntimeError: [/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer"
    records.update_record(run.run_dir, state=records.FAILED, error=f"Traceback ...\n{error}")
    console = Console(width=400, record=True)
    console.print(status_table(sweep, [run]))
    assert (
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer"
        in console.export_text()
    )
