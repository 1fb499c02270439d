"""Sweep files: every shipped file plans, grid expansion and run ids, errors that name file and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.executors import sbatch_preview
from launcher.grid import expand
from launcher.plan import submitit_folder
from launcher.sweep_file import SweepError, expand_env, load_sweep

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
        ({"base": ["model=vit_smal"]}, "model='vit_smal' is not allowed (did you mean vit_small?)"),
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
        (
            {"grid": {"optim.batch_size": [8, "abc"]}},
            "run batch_sizeabc: optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64",
        ),
        (
            {"base": ["model=vit_test", "train.compile=maybe"]},
            "train.compile='maybe' is not true or false; expected bool, e.g. train.compile=false",
        ),
        (
            {"root": "/r/${oc.env:USER}"},
            "root: cannot expand '/r/${oc.env:USER}'; write environment variables as",
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
    with pytest.raises(SweepError, match=r"quickstart.yaml: override '~train.seed' must look like key=value"):
        load_sweep(path, ["~train.seed"])
    # Any other key is a base override of every run, read like train reads it.
    assert load_sweep(path, ["data.root=/d/a=b"]).base[-1] == "data.root=/d/a=b"


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


def test_a_compact_status_keeps_each_run_on_one_line_but_a_failed_runs_note(tmp_path):
    """Long run names (no short_names), several seeds, a failed run: on 120 columns the axis and
    seed columns and the empty ones (GPU-hours, job) are left out and named, only the name and the
    note fold, and the state, step and loss of every run stay whole."""
    from rich.console import Console

    from launcher import records
    from launcher.status import status_table

    grid = {"model.patch_size": [8, 4], "optim.weight_decay": [0.04], "teacher.momentum": [0.996]}
    sweep = load_sweep(write_sweep(tmp_path, grid=grid, seeds=[0, 1], evals=["knn", "linear"]))
    runs = expand(sweep)
    for run in runs:
        records.update_record(run.run_dir, state=records.RUNNING, step=4520, total_steps=100000, loss=6.25)
    error = "RuntimeError: [/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed"
    records.update_record(runs[1].run_dir, state=records.FAILED, error=error, requeues=2)
    console = Console(width=120, record=True)
    console.print(status_table(sweep, runs, compact=True))
    text = console.export_text()
    header = " ".join(line for line in text.splitlines() if line.startswith("┃"))
    assert "seed" not in header and "patch_size" not in header and "job" not in header
    assert "requeues" in header and "note" in header and "linear" in header
    shows = "--wide also shows: model.patch_size, optim.weight_decay, teacher.momentum, seed, GPU-h spent/est., job"
    assert shows in text
    rows = [line for line in text.splitlines() if "4520/100000 (5%) │ 6.250 │" in line]
    assert [row.split("│")[2].strip() for row in rows] == ["lost", "failed", "lost", "lost"], text
    assert "Connection" in text and "1 failed, 3 lost" in text
    full = Console(width=400, record=True)
    full.print(status_table(sweep, runs))
    wide = full.export_text()
    assert "┃ model.patch_size ┃" in wide and "┃ seed ┃" in wide and "┃ job ┃" in wide


def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nbase: [model=vit_test\ngrid: {model.patch_size: [8]}\n")
    return path


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    """PyYAML's own message is 8 lines of context; the first (and only) line now says it all."""
    path = bad_yaml(tmp_path)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == (
        f"{path}: line 3, column 5: not valid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence at line 2, column 7)"
    )
    with pytest.raises(SweepError) as err:
        load_sweep(REPO / "sweeps" / "quickstart.yaml", ["root=[a"])
    assert "root=[a: line 1, column 3: not valid YAML: expected ',' or ']'" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value, expanded",
    [
        ("/c/$USER/x", "/c/alice/x"),
        ("/c/${USER}/x", "/c/alice/x"),
        ("/c/${USER:-ci}/x", "/c/alice/x"),
        ("/c/${DINOLAB_UNSET:-ci}/x", "/c/ci/x"),
        ("/c/${DINOLAB_EMPTY:-ci}/x", "/c/ci/x"),  # as in a shell, :- also replaces an empty value
        ("/c/${DINOLAB_EMPTY}x", "/c/x"),
        ("s3://b/${DINOLAB_UNSET:-}dino", "s3://b/dino"),
    ],
)
def test_environment_variables_and_defaults_in_paths(monkeypatch, value, expanded):
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("DINOLAB_EMPTY", "")
    monkeypatch.delenv("DINOLAB_UNSET", raising=False)
    assert expand_env(value, "s.yaml", "root") == expanded


def patch_size_copy(tmp_path: Path, root: str | None = None) -> Path:
    text = (REPO / "sweeps" / "patch_size.yaml").read_text()
    assert "root: /checkpoint/${USER}/dinolab" in text
    path = tmp_path / "patch_size.yaml"
    path.write_text(text.replace("/checkpoint/${USER}/dinolab", root) if root else text)
    return path


def unset_user_message(path: Path) -> str:
    return f"{path}: root: environment variable USER is not set; set it or give a default: ${{USER:-name}}"


def test_unset_user_names_the_variable_and_the_file(tmp_path, monkeypatch):
    """Containers, CI and cron have no $USER: OmegaConf said "Interpolation key 'USER' not found"
    about tracking.uri, a key that is not in the sweep file."""
    monkeypatch.delenv("USER", raising=False)
    path = patch_size_copy(tmp_path)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == unset_user_message(path)
    with pytest.raises(SweepError, match="logs_root: environment variable USER is not set"):
        load_sweep(path, ["root=/r", "logs_root=/shared/$USER"])
    assert load_sweep(path, ["root=/r"]).root == "/r"  # a root given on the command line needs no USER


def test_a_default_for_an_unset_user(tmp_path, monkeypatch):
    monkeypatch.delenv("USER", raising=False)
    path = patch_size_copy(tmp_path, "/checkpoint/${USER:-ci}/dinolab")
    sweep = load_sweep(path)
    assert sweep.root == "/checkpoint/ci/dinolab"
    assert sweep.tracking_uri == "sqlite:////checkpoint/ci/dinolab/mlflow.db"
    runs = expand(sweep)
    assert [r.run_dir for r in runs] == [f"/checkpoint/ci/dinolab/patch_size/{r.label}" for r in runs]
    assert all(r.config.tracking.uri == sweep.tracking_uri for r in runs)
    monkeypatch.setenv("USER", "alice")  # where USER is set it wins over the default
    assert load_sweep(path).root == "/checkpoint/alice/dinolab"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["yaml_syntax", "wrong_type", "unset_user", "user_default"])
def test_sweep_plan_through_the_cli(tmp_path, monkeypatch, case):
    """The real `dinolab sweep plan`: a user's mistake is one line on stderr, exit code 2."""
    monkeypatch.delenv("USER", raising=False)  # the child process inherits os.environ
    if case == "yaml_syntax":
        path = bad_yaml(tmp_path)
        line = f"{path}: line 3, column 5: not valid YAML: expected ',' or ']', but got ':'"
    elif case == "wrong_type":
        path = write_sweep(tmp_path, grid={"optim.batch_size": ["abc"]})
        line = f"{path}: run batch_sizeabc: optim.batch_size='abc' is not an integer; expected int, e.g. optim.batch_size=64"
    elif case == "unset_user":
        path = patch_size_copy(tmp_path)
        line = unset_user_message(path)
    else:
        path = patch_size_copy(tmp_path, "/checkpoint/${USER:-ci}/dinolab")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "sweep", "plan", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "Traceback" not in proc.stderr
    if case == "user_default":
        assert proc.returncode == 0, proc.stderr
        assert "2 runs in /checkpoint/ci/dinolab/patch_size" in proc.stdout
    else:
        assert proc.returncode == 2
        (only,) = proc.stderr.strip().splitlines()
        assert only.startswith(f"dinolab sweep: error: {line}")


@pytest.mark.parametrize(
    "content, edits, message",
    [
        ({"array_parallelism": "four"}, [], "array_parallelism: 'four' is not an integer; expected int"),
        ({}, ["array_parallelism=four"], "array_parallelism: 'four' is not an integer; expected int"),
        ({"seeds": [0, "one"]}, [], "seeds: [0, 'one'] is not a list of integers; expected list[int]"),
        ({"evals": "knn"}, [], "evals: 'knn' is not a list of strings; expected list[str]"),
        ({"max_timeouts": True}, [], "max_timeouts: True is not an integer; expected int"),
        (
            {"resources": {"pretrain": {"mem_gb": "lots"}}},
            [],
            "resources.pretrain.mem_gb: 'lots' is not a number; expected float",
        ),
        (
            {"resources": {"pretrain": 4}},
            [],
            "resources.pretrain: 4 is not a mapping of scheduler parameters",
        ),
        ({"arrray_parallelism": 2}, [], "unknown key 'arrray_parallelism' (did you mean array_parallelism?)"),
        (
            {"resources": {"knn": {"time_min": 5}}},
            [],
            "unknown key 'resources.knn.time_min' (did you mean timeout_min?)",
        ),
    ],
)
def test_the_sweep_file_is_checked_against_its_typed_schema(tmp_path, content, edits, message):
    """A wrong type or an unknown key names the file, the key and the value (and the nearest key)."""
    path = write_sweep(tmp_path, **content)
    with pytest.raises(SweepError) as err:
        load_sweep(path, edits)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


def test_right_types_and_empty_sections_pass(tmp_path):
    path = write_sweep(tmp_path, array_parallelism=3, budget="1e-6", base=None, logs_root=None)
    sweep = load_sweep(path, ["max_timeouts=5", "budget=2"])
    assert (sweep.array_parallelism, sweep.max_timeouts, sweep.budget, sweep.base) == (3, 5, 2.0, [])


def test_status_shows_a_hung_run_a_sustained_straggler_with_its_node_and_mixed_code(tmp_path):
    import os

    from rich.console import Console

    from launcher import records
    from launcher.status import status_table

    sweep = load_sweep(write_sweep(tmp_path, grid={"teacher.momentum": [0.99, 0.996, 0.999, 0.9995]}))
    runs = expand(sweep)
    for run in runs:  # live local jobs (this process's pid), each at step 100
        records.update_record(run.run_dir, state=records.RUNNING, step=100, total_steps=1000, loss=6.0,
                              code_hash="aaaaaaaa1111")  # fmt: skip
        records.add_job(run.run_dir, "pretrain", str(os.getpid()), "local", "out", "err")
    slow = {"rank": 1, "host": "n2", "ratio": 2.4, "step": 100}
    records.update_record(runs[0].run_dir, straggler={**slow, "windows": 3}, code_hash="bbbbbbbb2222")
    records.update_record(runs[1].run_dir, straggler={**slow, "windows": 2})  # not sustained yet
    message = "hung: rank 1 on n2 (pid 7) made no progress for 61 s (last heartbeat: step 90)"
    records.update_record(runs[2].run_dir, state=records.HUNG, error=message, hangs=1, hang_host="n2")
    console = Console(width=200, record=True)
    console.print(status_table(sweep, runs, compact=True))
    text = console.export_text()
    rows = {
        run.name: next(line for line in text.splitlines() if line.startswith(f"│ {run.name} "))
        for run in runs
    }
    assert "slow rank 1 on n2: 2.4x the others' step time (3 windows)" in rows[runs[0].name]
    assert "slow rank" not in rows[runs[1].name] and "heartbeat" in rows[runs[1].name]
    assert "│ hung " in rows[runs[2].name] and "hung: rank 1 on n2" in rows[runs[2].name]
    assert "bbbbbbbb" in rows[runs[0].name] and "aaaaaaaa" in rows[runs[3].name]  # two code versions: shown
    for run in runs[:2] + runs[3:]:
        records.update_record(run.run_dir, code_hash="aaaaaaaa1111")
    one_code = Console(width=200, record=True)
    one_code.print(status_table(sweep, runs, compact=True))
    one = one_code.export_text()
    assert "aaaaaaaa" not in one and "code" in one.split("--wide also shows")[-1]
    from launcher.plan import FAILED, classify

    (Path(runs[2].run_dir) / "jobs.json").unlink()  # its job is gone: the next submit retries it
    todo = next(t for t in classify(sweep, runs) if t.run.run_id == runs[2].run_id)
    assert (todo.action, todo.note) == (FAILED, "hung")
