"""The `docpipe` entry point: the pipeline's commands (pipeline.cli) plus `docpipe jobs`.

It lives in the top layer so that every import points down: jobs -> pipeline -> workers ->
models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

import pipeline.model_cli  # noqa: F401  (registers eval, moefy, calibrate on main)
from pipeline.cli import CONTEXT, Progress, _fail, main

__all__ = ["main"]


@main.group(context_settings=CONTEXT)
def jobs():
    """Job files: incremental, resumable and scheduled runs."""


def _load_job(job_file):
    from jobs.spec import JobSpecError, load_job

    try:
        return load_job(job_file)
    except JobSpecError as exc:
        raise _fail(exc) from None


def _print_job_summary(summary) -> None:
    click.echo(
        f"run {summary.run_id}: {summary.num_done} done, {summary.num_skipped} skipped, "
        f"{summary.num_failed} failed, {summary.num_cached_requests} requests from stored "
        f"results, {summary.num_retries} retried; "
        f"{summary.part.name if summary.part else 'no new part'} ({summary.wall_s:.1f} s)",
        err=True,
    )


@jobs.command("run", context_settings=CONTEXT)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--report", "make_report", is_flag=True,
              help="Also write the job's HTML report (`docpipe report`) into its output directory.")
def jobs_run(job_file, quiet, make_report):
    """Run JOB_FILE once: skip finished documents, resume interrupted work."""
    from jobs.runner import JobLocked, run_job
    from pipeline.service import ConfigError
    from pipeline.stores import StoreError

    spec = _load_job(job_file)
    progress = Progress(quiet)
    try:
        summary = run_job(spec, on_progress=progress)
    except (JobLocked, ConfigError, StoreError) as exc:
        raise _fail(exc) from None
    progress.close()
    _print_job_summary(summary)
    if make_report:
        from pipeline.report import write_report

        click.echo(f"wrote the report to {write_report(str(spec.output_dir))}", err=True)
    if summary.num_failed:
        sys.exit(2)


@jobs.command("schedule", context_settings=CONTEXT)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Run now, once, and exit (for cron and CI).")
@click.option("--max-runs", type=int, default=None, help="Stop after N runs.")
def jobs_schedule(job_file, once, max_runs):
    """Run JOB_FILE on its [schedule] cron expression, in the foreground."""
    from jobs.schedule import run_schedule
    from pipeline.service import ConfigError
    from pipeline.stores import StoreError

    spec = _load_job(job_file)
    if not once and not spec.cron:
        raise click.ClickException(f"{job_file}: no [schedule] cron; add one or pass --once")
    try:
        results = run_schedule(spec, once=once, max_runs=max_runs)
    except (ConfigError, StoreError) as exc:
        raise _fail(exc) from None
    for summary in results:
        if summary is None:
            click.echo("no result for this tick: another run of this job was in progress, or "
                       "the run failed (`docpipe jobs ledger` shows the error)", err=True)
        else:
            _print_job_summary(summary)


@jobs.command("ledger", context_settings=CONTEXT)
@click.argument("job_file", type=click.Path(path_type=Path))
def jobs_ledger(job_file):
    """Print the job's run ledger."""
    from jobs.state import JobState

    spec = _load_job(job_file)
    remote = isinstance(spec.output_dir, str)  # a URI: the state is rebuilt from its objects
    if not remote and not (spec.output_dir / "_state.sqlite").exists():
        raise click.ClickException(f"{spec.output_dir}: the job has not run yet")
    state = JobState(spec.output_dir)
    try:
        if remote and not state.ledger():
            raise click.ClickException(f"{spec.output_dir}: the job has not run yet")
        for r in state.ledger():
            click.echo(
                f"run {r['run_id']}  {r['status']:<15} done {r['num_done']}  skipped {r['num_skipped']}  "
                f"failed {r['num_failed']}  retries {r['num_retries']}  part {r['part']}"
                + (f"  error {r['note']}" if r.get("note") else "")
            )
    finally:
        state.close()


if __name__ == "__main__":
    main()
