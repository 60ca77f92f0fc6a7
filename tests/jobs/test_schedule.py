"""The scheduler keeps going when a run fails, and reads its cron in the job's time zone.
Time is driven by a fake clock: nothing sleeps."""

from datetime import datetime
from zoneinfo import ZoneInfo

from jobs.runner import run_job
from jobs.schedule import next_tick, run_schedule
from jobs.spec import load_job
from jobs.state import JobState
from tests.fakes import EchoPool
from tests.jobs.test_jobs import make_job


def fake_time(start: float):
    clock = [start]

    def sleep(dt):
        clock[0] += dt

    return clock, (lambda: clock[0]), sleep


def test_a_failed_run_is_recorded_and_the_next_tick_runs(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir, **{"[schedule]": 'cron = "0 * * * *"'})
    hidden = tmp_path / "store-away"
    num_calls = [0]

    def run(s):
        num_calls[0] += 1
        if num_calls[0] == 2:  # the store is unmounted: the whole run fails
            s.input_path.rename(hidden)
        elif num_calls[0] == 3:
            hidden.rename(s.input_path)
            (s.input_path / "doc0.txt").write_text("Changed. " * 40)
        return run_job(s, pool=EchoPool())

    clock, now, sleep = fake_time(10 * 3600 + 30.0)
    results = run_schedule(spec, max_runs=3, clock=now, sleep=sleep, run=run)
    assert num_calls[0] == 3 and clock[0] == 13 * 3600
    assert results[1] is None
    assert (results[0].num_done, results[2].num_done) == (5, 1)
    ledger = JobState(spec.output_dir).ledger()
    assert [r["status"] for r in ledger] == ["ok", "failed", "ok"]
    assert "StoreError" in ledger[1]["note"] and "store" in ledger[1]["note"], ledger[1]["note"]


def test_a_run_that_fails_without_a_ledger_entry_gets_one(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir, **{"[schedule]": 'cron = "*/10 * * * *"'})
    calls = []

    def run(s):
        calls.append(len(calls))
        if len(calls) == 2:
            raise OSError("disk full")
        return "ran"

    _, now, sleep = fake_time(1000.0)
    assert run_schedule(spec, max_runs=3, clock=now, sleep=sleep, run=run) == ["ran", None, "ran"]
    (entry,) = JobState(spec.output_dir).ledger()
    assert entry["status"] == "failed" and entry["note"] == "OSError: disk full"


def test_cron_in_the_jobs_time_zone(tiny_model_dir, tmp_path):
    winter = datetime(2026, 1, 15, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    summer = datetime(2026, 7, 15, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    assert next_tick("0 2 * * *", winter) == datetime(2026, 1, 16, 2, tzinfo=ZoneInfo("UTC")).timestamp()
    paris = ZoneInfo("Europe/Paris")
    for base, utc_hour in ((winter, 1), (summer, 0)):  # 02:00 in Paris is 01:00 / 00:00 UTC
        tick = next_tick("0 2 * * *", base, "Europe/Paris")
        local = datetime.fromtimestamp(tick, paris)
        assert (local.hour, local.minute) == (2, 0)
        assert datetime.fromtimestamp(tick, ZoneInfo("UTC")).hour == utc_hour

    spec = make_job(tmp_path, tiny_model_dir,
                    **{"[schedule]": 'cron = "0 2 * * *"\ntimezone = "Asia/Tokyo"'})
    assert load_job(spec.source).timezone == "Asia/Tokyo"
    calls = []
    clock, now, sleep = fake_time(winter)
    run_schedule(spec, max_runs=1, clock=now, sleep=sleep, run=lambda s: calls.append(now()))
    # 02:00 in Tokyo (UTC+9) is 17:00 UTC the day before; the next one after 12:00 UTC
    assert datetime.fromtimestamp(calls[0], ZoneInfo("UTC")) == datetime(
        2026, 1, 15, 17, 0, tzinfo=ZoneInfo("UTC"))
