"""Fault drill: SIGKILL a W100K-sized job's driver at random moments, rerun it each time, and
check that nothing is lost and nothing stored is recomputed.

    python benchmarks/fault_drill.py [--kills 5] [--seed 0] [--limit-chunks N]

1. Baseline: the job run once, uninterrupted (its dataset and its number of model requests).
2. Drill, in a fresh job directory: the job runs in a subprocess that the drill SIGKILLs after
   a random delay (uniform over the time the rest of the job should take); the child writes
   how many requests it had sent to the model and how many results it had stored, after each
   of them, so the drill knows what was in flight at the kill. Repeated `--kills` times, then
   one last run to the end.
3. Checks: the final dataset equals the baseline's (greedy decoding, batch-invariant engine);
   each rerun sends only requests with no stored result (all requests sent over the drill =
   the baseline's + the requests in flight at each kill: the model work redone is at most
   what was in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).parent))
from resume import COMPARE, job_file, rows, write_store  # noqa: E402

CHILD = """
import json, sys
import jobs.runner as runner_mod
import jobs.state as state_mod
import pipeline.runner as pr
from jobs.spec import load_job

side = sys.argv[2]
counts = {"sent": 0, "stored": 0}
def dump():
    with open(side + ".tmp", "w") as f:
        json.dump(counts, f)
    import os; os.replace(side + ".tmp", side)
orig_submit = pr.PipelineRunner._submit
def counting_submit(self, state, reqs):
    orig_submit(self, state, reqs)
    counts["sent"] = self.stats.num_requests
    dump()
pr.PipelineRunner._submit = counting_submit
# the runner hands every delivered result to store_result, stored ones too: count new ones
served = set()
orig_cached = state_mod.JobState.cached
def noting_cached(self, request_id):
    hit = orig_cached(self, request_id)
    if hit is not None:
        served.add(request_id)
    return hit
state_mod.JobState.cached = noting_cached
orig_store = state_mod.JobState.store_result
def counting_store(self, doc, req, res):
    orig_store(self, doc, req, res)
    if res.request_id not in served:
        counts["stored"] += 1
        dump()
state_mod.JobState.store_result = counting_store
summary = runner_mod.run_job(load_job(sys.argv[1]))
counts["done"] = True
counts["cached"] = summary.num_cached_requests
dump()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-chunks", type=int, default=None,
                    help="use only the first N*1792 tokens of the document (quick runs)")
    args = ap.parse_args()
    from jobs.runner import read_dataset, run_job
    from jobs.spec import load_job

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="docpipe-drill-"))
    try:
        store = write_store(root, args.limit_chunks)

        t0 = time.perf_counter()
        base = run_job(load_job(job_file(root, store, root / "baseline")))
        t_base = time.perf_counter() - t0
        total = base.num_requests
        baseline = rows(read_dataset(root / "baseline"))
        print(f"baseline: {total} model requests, {t_base:.1f} s, columns compared: {COMPARE}")

        spec = load_job(job_file(root, store, root / "drill"))
        child = root / "child.py"
        child.write_text(CHILD)
        sent_total, redone_allowed, stored_before = 0, 0, 0
        for i in range(args.kills + 1):
            side = root / f"run-{i}.json"
            proc = subprocess.Popen([sys.executable, str(child), str(spec.source), str(side)],
                                    env=dict(os.environ), stderr=subprocess.DEVNULL)
            last = i == args.kills
            if not last:
                remaining = t_base * (total - stored_before) / total
                delay = rng.uniform(0.05, 0.8) * remaining + 3.0  # + the child's start
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            counts = json.loads(side.read_text()) if side.exists() else {"sent": 0, "stored": 0}
            in_flight = counts["sent"] - counts["stored"]
            sent_total += counts["sent"]
            stored_before += counts["stored"]
            if counts.get("done"):
                print(f"run {i}: finished (rc {rc}); sent {counts['sent']} requests, "
                      f"{counts['cached']} served from stored results")
                break
            redone_allowed += in_flight
            print(f"run {i}: SIGKILL after {delay:.1f} s: {counts['stored']} new results stored "
                  f"({stored_before}/{total} in all), {in_flight} in flight (redone next run)")
        else:
            raise SystemExit("the last run did not finish")
        assert i == args.kills or counts.get("done"), "a run finished before it could be killed"
        got = rows(read_dataset(spec.output_dir))
        assert got == baseline, "the drilled dataset differs from the uninterrupted run's"
        print(f"kills: {i} | final dataset equals the uninterrupted run's: yes ({len(got)} rows)")
        print(f"model requests over the drill: {sent_total} = {total} (baseline) + {sent_total - total} "
              f"redone; in flight at the kills: {redone_allowed} (goal: redone <= in flight)")
        assert sent_total - total <= redone_allowed, "stored results were recomputed"
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
