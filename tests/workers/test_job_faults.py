"""Fault drill: a model replica killed mid-run is restarted, the job completes, the ledger
counts the retries."""

import os
import signal
import threading
import time

import pytest

from jobs.runner import read_dataset, run_job
from jobs.state import JobState
from pipeline.service import engine_spec
from tests.jobs.test_jobs import make_job
from workers.pool import RayPool

pytestmark = pytest.mark.ray


def test_worker_killed_mid_run_completes_and_counts_retries(ray_session, tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    spec.run.max_summary_tokens = 24
    pool = RayPool(engine_spec(spec.run), num_replicas=1, num_cpus=1)
    (pid,) = pool.replica_pids()
    killed = threading.Event()

    def kill_when_busy():
        db = spec.output_dir / "_state.sqlite"
        deadline = time.time() + 60
        while time.time() < deadline:
            if db.exists() and JobState(spec.output_dir).num_results() >= 3:
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        summary = run_job(spec, pool=pool)
    finally:
        pool.close()
    killer.join()
    assert killed.is_set(), "the drill never killed the worker"
    assert summary.num_done == 5 and summary.num_failed == 0
    assert summary.num_retries > 0
    assert JobState(spec.output_dir).ledger()[-1]["num_retries"] == summary.num_retries
    assert sorted(read_dataset(spec.output_dir).column("doc_id").to_pylist()) == [f"doc{i}.txt" for i in range(5)]
