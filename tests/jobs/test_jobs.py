"""Incremental and resumable job runs, fault drills, and schedules (tiny model, in process)."""

import os
import signal
import subprocess
import sys

import pytest

from jobs.runner import JobLocked, job_lock, read_dataset, run_job
from jobs.schedule import missed_ticks, run_schedule
from jobs.spec import load_job
from jobs.state import JobState
from tests.jobfiles import tiny_job_text

COMPARE = ["doc_id", "status", "error", "summary", "chunks", "num_tokens", "num_chunks",
           "config_fingerprint", "content_hash", "prompt_tokens", "generated_tokens"]


def make_job(tmp_path, model_dir, store=None, **extra):
    store = store or tmp_path / "store"
    if not store.exists():
        store.mkdir()
        for i in range(5):
            (store / f"doc{i}.txt").write_text(f"Document {i}. " + "The sea was calm that night. " * (20 + 15 * i))
    text = tiny_job_text(store, tmp_path / "out", model_dir)
    for k, v in extra.items():
        text += f"{k}\n{v}\n"
    path = tmp_path / "job.toml"
    path.write_text(text)
    return load_job(path)


def dataset_rows(out):
    table = read_dataset(out)
    rows = sorted(table.select(COMPARE).to_pylist(), key=lambda r: r["doc_id"])
    return rows


def test_incremental_runs(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    first = run_job(spec)
    assert (first.num_done, first.num_skipped, first.num_failed) == (5, 0, 0)
    again = run_job(spec)
    assert (again.num_done, again.num_skipped, again.num_requests) == (0, 5, 0)
    assert again.part is None
    # change one document, add a broken one: only those are processed
    (spec.input_path / "doc2.txt").write_text("Changed. " * 40)
    (spec.input_path / "bad.txt").write_bytes(b"\x00\x01binary")
    third = run_job(spec)
    assert (third.num_done, third.num_skipped, third.num_failed) == (1, 4, 1)
    rows = dataset_rows(spec.output_dir)
    assert [r["doc_id"] for r in rows] == ["bad.txt", "doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt", "doc4.txt"]
    # the error row is retried next time (and fails again), never duplicated
    (spec.input_path / "bad.txt").write_text("Now it is fine. " * 10)
    fourth = run_job(spec)
    assert (fourth.num_done, fourth.num_failed) == (1, 0)
    rows = dataset_rows(spec.output_dir)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    ledger = JobState(spec.output_dir).ledger()
    assert [r["num_done"] for r in ledger] == [5, 0, 1, 1]
    assert (spec.output_dir / "_ledger.jsonl").read_text().count("\n") == 4


def test_lock_prevents_two_runs(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    with job_lock(spec.output_dir):
        with pytest.raises(JobLocked, match="another run of this job is in progress"):
            run_job(spec)
        assert run_schedule(spec, once=True) == [None]


KILL_SCRIPT = """
import os, signal, sys
from jobs.runner import run_job
from jobs.spec import load_job
import jobs.state as state_mod

limit = int(sys.argv[2])
orig = state_mod.JobState.store_result
count = 0
def store_then_maybe_die(self, doc, req, res):
    global count
    orig(self, doc, req, res)
    count += 1
    if count >= limit:
        os.kill(os.getpid(), signal.SIGKILL)
state_mod.JobState.store_result = store_then_maybe_die
run_job(load_job(sys.argv[1]))
"""


@pytest.mark.parametrize("kill_after", [1, 7, 15])
def test_driver_sigkill_then_rerun_gives_identical_dataset(tiny_model_dir, tmp_path, kill_after):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference = make_job(ref_dir, tiny_model_dir)
    run_job(reference)
    expected = dataset_rows(reference.output_dir)

    work = tmp_path / "killed"
    work.mkdir()
    spec = make_job(work, tiny_model_dir, store=reference.input_path)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(spec.source), str(kill_after)],
                          cwd=os.getcwd(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stored = JobState(spec.output_dir).num_results()
    assert stored >= kill_after
    resumed = run_job(spec)
    assert resumed.num_cached_requests >= kill_after  # finished work was not redone
    assert dataset_rows(spec.output_dir) == expected
    ledger = JobState(spec.output_dir).ledger()
    assert [r["status"] for r in ledger] == ["killed", "ok"]


def test_missed_tick_policy_and_once(tiny_model_dir, tmp_path):
    assert missed_ticks("0 * * * *", 0.0, 3 * 3600 + 5) == 3
    assert missed_ticks("0 * * * *", None, 10**9) == 0
    calls = []

    def fake_run(spec):
        calls.append(clock[0])
        return None

    spec = make_job(tmp_path, tiny_model_dir, **{"[schedule]": 'cron = "0 * * * *"\nmissed = "run-once"'})
    clock = [10 * 3600 + 30.0]
    JobState(spec.output_dir.mkdir(parents=True) or spec.output_dir).set_last_tick(spec.name, 7 * 3600)

    def sleep(dt):
        clock[0] += dt

    results = run_schedule(spec, max_runs=3, clock=lambda: clock[0], sleep=sleep, run=fake_run)
    # one catch-up run for the missed ticks (8h, 9h, 10h), then the 11h and 12h ticks
    assert len(results) == 3
    assert calls == [10 * 3600 + 30.0, 11 * 3600, 12 * 3600]
