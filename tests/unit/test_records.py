"""Run records: one writer per file. The k-NN and linear jobs of one run finishing together each
write their own state file, so neither can overwrite the other's (they shared record.json's `evals`
before, read-modify-write)."""

from __future__ import annotations

import json
import multiprocessing

from launcher import records

ROUNDS = 150


def _evaluate(run_dir: str, protocol: str, start) -> None:
    start.wait()
    for _ in range(ROUNDS):
        records.set_eval_state(run_dir, protocol, records.RUNNING)
    records.set_eval_state(run_dir, protocol, records.COMPLETED)


def test_two_evaluations_finishing_together_keep_both_states(tmp_path):
    run_dir = str(tmp_path / "run")
    records.update_record(run_dir, state=records.COMPLETED, step=16)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    jobs = [ctx.Process(target=_evaluate, args=(run_dir, p, start)) for p in records.EVAL_PROTOCOLS]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    record = records.read_record(run_dir)
    assert record["evals"] == {"knn": records.COMPLETED, "linear": records.COMPLETED}
    assert record["state"] == records.COMPLETED and record["step"] == 16  # the job's own file untouched


def test_older_records_keep_their_evaluation_states_and_a_resubmission_forgets_them(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / records.RECORD).write_text(json.dumps({"state": "completed", "evals": {"knn": "failed"}}))
    assert records.read_record(str(run_dir))["evals"] == {"knn": "failed"}  # written before the split
    records.set_eval_state(str(run_dir), "knn", records.COMPLETED)
    assert records.read_record(str(run_dir))["evals"] == {"knn": "completed"}  # the job's own file wins
    saved = records.snapshot(str(run_dir))
    records.mark_pending(str(run_dir), {})
    assert records.read_record(str(run_dir))["evals"] == {}
    records.restore(str(run_dir), saved)  # a refused submission leaves no trace, eval states included
    assert records.read_record(str(run_dir))["evals"] == {"knn": "completed"}
    assert records.read_record(str(tmp_path / "never-ran")) == {}
