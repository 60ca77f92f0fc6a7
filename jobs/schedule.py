"""`docpipe jobs schedule`: run a job on its cron expression, in the foreground.

Policy:
- Never two runs of one job at once: each run takes the job's lock; a tick that finds it held
  (another scheduler, a manual `jobs run`) is skipped and logged.
- Missed ticks (the scheduler was down, or a run outlasted the next tick) are coalesced:
  `missed = "skip"` (default) waits for the next tick; `missed = "run-once"` runs once at
  start-up / after the long run if at least one tick was missed, then follows the schedule.
  The last tick handled is kept in the job's state DB, so a restarted scheduler knows what it
  missed.
- A run that fails (a bad store, a model error, a crash in docpipe) is recorded in the
  ledger with status `failed` and the error, logged, and the scheduler goes on to the next
  tick; `--once` re-raises it.
- The cron expression is evaluated in the job's `timezone` (default UTC), so "0 2 * * *"
  with timezone = "Europe/Paris" runs at 02:00 Paris time across DST changes.
- `--once` runs the job now (no waiting) and exits: for cron and CI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from jobs.runner import JobLocked, JobRunSummary, run_job
from jobs.spec import JobSpec
from jobs.state import JobState
from pipeline.fs import as_local_or_uri

logger = logging.getLogger(__name__)


def next_tick(cron: str, after: float, timezone: str = "UTC") -> float:
    """The first tick after `after` (a Unix time), the cron read as wall-clock time in
    `timezone`."""
    from croniter import croniter

    base = datetime.fromtimestamp(after, tz=ZoneInfo(timezone))
    return croniter(cron, base).get_next(float)


def missed_ticks(cron: str, last: float | None, now: float, timezone: str = "UTC") -> int:
    """How many ticks fell in (last, now]; 0 when there is no record."""
    if last is None:
        return 0
    count, t = 0, next_tick(cron, last, timezone)
    while t <= now and count < 1000:
        count += 1
        t = next_tick(cron, t, timezone)
    return count


def run_schedule(
    spec: JobSpec,
    *,
    once: bool = False,
    max_runs: int | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    run: Callable[[JobSpec], JobRunSummary] = run_job,
) -> list[JobRunSummary | None]:
    """Run `spec` on its schedule. Returns one entry per tick handled (None: skipped because
    the job was locked, or the run failed; a failure is in the ledger)."""
    if once:
        return [_run_locked(spec, run, reraise=True)]
    if not spec.cron:
        raise ValueError(f"{spec.source}: no [schedule] cron; add one or use --once")
    out = _output(spec)
    results: list[JobRunSummary | None] = []

    def record(tick: float) -> None:
        state = JobState(out)
        try:
            state.set_last_tick(spec.name, tick)
        finally:
            state.close()

    state = JobState(out)
    last = state.last_tick(spec.name)
    state.close()
    now = clock()
    if last is not None and spec.missed == "run-once" and missed_ticks(spec.cron, last, now, spec.timezone):
        logger.info("%s: catching up on ticks missed since %s", spec.name, last)
        results.append(_run_locked(spec, run))
        record(now)
    elif last is None:
        record(now)  # first start: nothing is "missed" before the scheduler existed
    while max_runs is None or len(results) < max_runs:
        target = next_tick(spec.cron, clock(), spec.timezone)
        while (delay := target - clock()) > 0:
            sleep(min(delay, 60.0))
        results.append(_run_locked(spec, run))
        finished = clock()
        n_missed = missed_ticks(spec.cron, target, finished, spec.timezone)
        if n_missed:
            logger.warning("%s: the run outlasted %d tick(s); policy %s", spec.name, n_missed, spec.missed)
            if spec.missed == "run-once" and (max_runs is None or len(results) < max_runs):
                results.append(_run_locked(spec, run))
        record(clock())
    return results


def _output(spec: JobSpec) -> Path | str:
    """The job's output directory, created if local; a URI (s3://...) as is: its state,
    schedule ticks included, lives in objects beside the output (jobs.remote_state)."""
    out = as_local_or_uri(spec.output_dir)
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    return out


def _run_locked(spec: JobSpec, run: Callable[[JobSpec], JobRunSummary], *,
                reraise: bool = False) -> JobRunSummary | None:
    out = _output(spec)
    state = JobState(out)
    try:
        last_run_id = state.last_run_id()
    finally:
        state.close()
    try:
        return run(spec)
    except JobLocked as exc:
        logger.warning("skipping this tick: %s", exc)
        return None
    except Exception as exc:
        note = f"{type(exc).__name__}: {exc}"
        state = JobState(out)
        try:
            # run_job records its own failures; this covers the rest (a crash before its
            # ledger entry, or a `run` that does not keep one).
            state.record_failure(after_run_id=last_run_id, note=note)
        finally:
            state.close()
        if reraise:
            raise
        logger.error("%s: the run failed (%s); recorded in the ledger, waiting for the next "
                     "tick", spec.name, note, exc_info=True)
        return None
