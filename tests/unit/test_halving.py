"""Successive halving's rules without training (launcher/halving.py): the sweep file's `search:`
block, the decision of a rung over records as the jobs write them, what `plan` does with each run,
and the cost. Real searches: tests/integration/test_halving.py."""

from __future__ import annotations

import json

import pytest
import yaml

from launcher import cost, halving, plan, records
from launcher.cost import speeds
from launcher.grid import expand
from launcher.sweep_file import SweepError, load_sweep

BASE = ["model=vit_test", "data=synthetic", "data.num_samples=64", "data.image_size=32", "optim.batch_size=8",
        "train.device=cpu"]  # fmt: skip


def _sweep(tmp_path, search=None, seeds=(0,), **extra):
    raw = {"name": "hv", "root": str(tmp_path / "runs"), "base": BASE, "tracking_uri": "none",
           "grid": {"optim.lr": [0.001, 0.01, 0.1], "teacher.momentum": [0.9, 0.99, 0.996]},
           "seeds": list(seeds), "search": search if search is not None else
           {"strategy": "halving", "rungs": [0.25, 1.0], "keep": 3}, **extra}  # fmt: skip
    path = tmp_path / "hv.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            {"strategy": "halfing"},
            "search.strategy: 'halfing' (did you mean halving?); allowed: grid, halving",
        ),
        (
            {"rungs": [0.5]},
            "search.rungs: [0.5] must be increasing fractions of the schedule in (0, 1], the last 1.0",
        ),
        ({"rungs": [0.5, 0.2, 1.0]}, "must be increasing"),
        ({"keep": 1}, "search.keep: 1 must be at least 2"),
        ({"kepe": 3}, "unknown key 'search.kepe' (did you mean keep?)"),
        ({"mode": "maximum"}, "search.mode: 'maximum'"),
        ({"keep": "three"}, "search.keep: 'three' is not"),
    ],
)
def test_a_bad_search_block_names_the_key_and_the_file(tmp_path, search, message):
    path = _sweep(tmp_path, search)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_the_default_search_is_the_grid_and_search_keys_edit_from_the_command_line(tmp_path):
    assert not load_sweep(_sweep(tmp_path, {})).search.halving
    edited = load_sweep(_sweep(tmp_path), ["search.keep=2", "search.rungs=[0.1,0.5,1.0]"]).search
    assert (edited.halving, edited.keep, edited.rungs) == (True, 2, [0.1, 0.5, 1.0])


def _reach(run, fraction, value, gpu_hours=0.01):
    """What a TrainJob records when it stops at a rung (launcher/jobs.py _record_pause)."""
    rung = {
        "step": 8,
        "gpu_hours": gpu_hours,
        "metrics": {} if value is None else {"monitor_knn_top1": value},
    }
    records.update_record(run.run_dir, state=records.PAUSED, step=8, total_steps=32, gpu_hours=gpu_hours,
                          rungs={halving.fraction_key(fraction): rung})  # fmt: skip


def test_a_rung_keeps_the_best_cells_on_their_seeds_mean_and_prunes_the_rest_once(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, seeds=(0, 1)))
    runs = expand(sweep)
    assert len(runs) == 18 and halving.count_cells(runs) == 9
    todos = plan.classify(sweep, runs)
    assert {(t.action, t.stop_at, tuple(t.evals)) for t in todos} == {(plan.NEW, 0.25, ())}
    # cell value = the mean of its two seeds; one seed of the best cell failed (no value): the mean of
    # the other; a cell with no value at all is worst.
    values = {}
    for i, run in enumerate(runs):
        cell = i // 2
        value = None if cell == 8 else float(10 * cell + (5 if run.seed else 0))
        if cell == 7 and run.seed == 1:
            value = None  # failed before the rung: its cell counts on seed 0 alone (70)
        values[run.run_id] = value
        _reach(run, 0.25, value)
    todos = plan.classify(sweep, runs)
    assert {t.action for t in todos} == {plan.AWAIT}
    decision = halving.decide(sweep, runs, 0)
    kept = [c["name"] for c in decision["cells"] if c["kept"]]
    assert [c["value"] for c in decision["cells"]][:4] == [70.0, 62.5, 52.5, 42.5]
    assert len(kept) == 3 and decision["cells"][-1]["value"] is None  # ceil(9/3) cells; no value: last
    assert len(decision["promoted"]) == 6 and len(decision["pruned"]) == 12  # all seeds of a cell together
    pruned = records.read_record(runs[0].run_dir)
    assert pruned["state"] == records.PRUNED and pruned["pruned_at"] == 0.25 and pruned["cell_value"] == 2.5
    assert pruned["saved_gpu_hours"] == pytest.approx(0.01 * 3)  # 75% of the schedule not spent
    # Decided once: the same answer, nothing rewritten, however often the decision job runs.
    before = (tmp_path / "runs" / "hv" / "search.json").read_text()
    assert halving.decide(sweep, runs, 0) == json.loads(before)["rungs"]["0"]
    assert (tmp_path / "runs" / "hv" / "search.json").read_text() == before
    # The plan now: promoted runs to the end with their evaluations, the others skipped.
    todos = {t.run.run_id: t for t in plan.classify(sweep, runs)}
    for run_id in decision["promoted"]:
        assert (todos[run_id].action, todos[run_id].stop_at, todos[run_id].rung) == (plan.RESUME, 0.0, 1)
    assert {todos[r].action for r in decision["pruned"]} == {plan.PRUNED}
    train, _ = plan.to_submit(list(todos.values()))
    assert {t.run.run_id for t in train} == set(decision["promoted"])
    revive, _ = plan.to_submit(list(todos.values()), only="pruned")
    assert {t.run.run_id for t in revive} == set(decision["pruned"])
    halving.revive(sweep, [t.run for t in revive[:2]])
    again = {t.run.run_id: t for t in plan.classify(sweep, runs)}
    assert [again[t.run.run_id].stop_at for t in revive[:2]] == [0.0, 0.0]  # revived: on to the end


def test_a_damaged_search_file_is_named_not_read_as_empty(tmp_path):
    from launcher.errors import UserError

    sweep = load_sweep(_sweep(tmp_path))
    path = tmp_path / "runs" / "hv" / halving.SEARCH_FILE
    path.parent.mkdir(parents=True)
    for damaged, why in (('{"rungs": {"0": ', "Expecting value"), ("[1, 2]", "a JSON list, not an object")):
        path.write_text(damaged)
        with pytest.raises(UserError, match=f"{path} is damaged \\({why}.*decided again"):
            halving.read_state(sweep)
        assert path.read_text() == damaged  # nothing rewritten


def test_the_expected_cost_of_a_search_against_the_full_grid(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, {"strategy": "halving", "rungs": [0.2, 0.5, 1.0], "keep": 3}))
    assert halving.runs_per_rung(sweep, 9) == [9, 3, 1]
    # 9 cells to 20%, 3 on to 50%, 1 to the end: (9*0.2 + 3*0.3 + 1*0.5) / 9 of the full grid
    assert halving.halving_fraction(sweep, 9) == pytest.approx((1.8 + 0.9 + 0.5) / 9)
    assert halving.runs_per_rung(sweep, 10) == [10, 4, 2]

    # Each run: 1 h of images, 0.1 h its job pays once (measured), 0.1 h of k-NN. The search streams
    # 3.2/9 of the images, starts 9 + 3 + 1 jobs where the grid starts 9, and evaluates 1 cell.
    measured = cost.Speed(1.0, None, speeds.MEASURED, "", fixed_s=360.0)
    knn = cost.Speed(1.0, None, speeds.ESTIMATED, "")
    full = cost.SweepCost([cost.RunCost(r, [cost.StageCost("pretrain", 3600, 1, measured),
                                            cost.StageCost("knn", 360, 1, knn)]) for r in expand(sweep)], None)  # fmt: skip
    search, whole, line = halving.expected_cost(sweep, full)
    assert whole == pytest.approx(9 * 1.2) and search == pytest.approx(3.2 + 1.3 + 0.1)
    assert line.endswith("9 → 3 → 1 cells; expected 4.6 GPU-hours (pretrain 4.5) against 10.8 for the full grid "
                         "(57% less)")  # fmt: skip


def test_cancelling_a_search_cancels_its_decision_jobs(tmp_path):
    import subprocess

    from launcher.submission import cancel_deciders

    sweep = load_sweep(_sweep(tmp_path))
    decider = subprocess.Popen(["sleep", "30"])  # a live local job: its id is its process's
    halving.write_state(
        sweep, {"rungs": {}, "deciders": {"0": {"executor": "local", "job_id": str(decider.pid)}}}
    )
    assert cancel_deciders(sweep) == [f"cancelled the decision of rung 0 (job {decider.pid})"]
    assert decider.wait(timeout=10) < 0  # SIGTERM: it will not submit the next rung
    assert cancel_deciders(sweep) == []
