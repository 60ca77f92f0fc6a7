"""`docpipe jobs run`: one incremental, resumable run of a job.

    output_dir/
      part-00001.parquet ...   the dataset: one row per document, across parts
      _ledger.jsonl            one line per run (also in the state DB)
      _state.sqlite            stored request results, document index, ledger
      _requests/run-<id>.arrow each run's per-request timings (pipeline.request_log)
      .lock                    held while a run is in progress
      .part-00002.parquet.inprogress[.tmp-<pid>]   the running run's rows

Names starting with `_` or `.` are skipped by dataset readers (pyarrow, Spark), and only the
parts end in `.parquet` (DuckDB's `read_parquet('output_dir/*.parquet')`), so the directory
reads as exactly one row per document. Temporary files a killed run left (`*.tmp-<pid>`
whose process is gone, in-progress parts no publish will finish) are removed at the next
start. An `s3://` (or other URI) output directory holds the same files but `_state.sqlite`
and `.lock`: its state is objects beside the parts (jobs.remote_state).

A run skips documents whose (id, content hash, config fingerprint) already has an `ok` row,
redoes changed documents and earlier error rows, serves every request already answered in an
earlier (possibly killed) run from the state DB, and publishes its rows as `part-<run id>`,
removing the rows it supersedes from older parts.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs.spec import JobSpec
from jobs.state import JobState
from pipeline.fs import Location, as_local_or_uri, open_local_or_remote
from pipeline.output import remove_stale_tmp_files
from pipeline.request_log import RequestLog
from pipeline.service import open_pool, route_columns, run_documents, run_fingerprint
from pipeline.stores import Document, open_store

logger = logging.getLogger(__name__)


class JobLocked(RuntimeError):
    """Another run of the same job holds its lock."""


@contextmanager
def job_lock(output_dir: Path | str):
    """An exclusive, non-blocking lock on the job's output directory (released on exit or
    when the process dies, so a killed run never leaves a stale lock); yields the S3 lease
    or None. For a URI the local lock file is in the job's cache directory, and an s3://
    directory also takes a lease object that every machine respects (jobs.remote_lock);
    other schemes are locked on this machine only (logged)."""
    lease = None
    if isinstance(output_dir, str):
        from jobs.remote_lock import supports_lease
        from jobs.remote_state import job_cache_dir

        lock_path = job_cache_dir(output_dir) / ".lock"
        if supports_lease(output_dir):
            from jobs.remote_lock import S3Lease

            lease = S3Lease(output_dir)
        else:
            logger.warning("%s: no cross-machine lock for this store (s3:// with boto3 has "
                           "one: pip install boto3); runs on other machines are not kept "
                           "apart", output_dir)
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock_path = output_dir / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobLocked(f"{output_dir}: another run of this job is in progress") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if lease is not None:
            from jobs.remote_lock import LeaseHeld

            try:
                lease.acquire()
            except LeaseHeld as exc:
                raise JobLocked(str(exc)) from None
        try:
            yield lease
        finally:
            if lease is not None:
                lease.release()
    finally:
        os.close(fd)


@dataclass(slots=True)
class JobRunSummary:
    run_id: int
    num_done: int
    num_skipped: int
    num_failed: int
    num_retries: int
    num_cached_requests: int
    num_requests: int
    part: Path | None
    wall_s: float


def run_job(spec: JobSpec, *, engine=None, pool=None,
            on_progress: Callable | None = None) -> JobRunSummary:
    """Run the job once. `engine`/`pool` inject an in-process engine or a pool (tests).
    `spec.output_dir` may be a URI (s3://...; its state: jobs.remote_state)."""
    out = as_local_or_uri(spec.output_dir)
    with job_lock(out) as lease:
        state = JobState(out)
        try:
            state.recover()
            _remove_leftovers(state.dir)
            run_id = state.begin_run()
            try:
                fingerprint = run_fingerprint(spec.run)
                # opened now, so a bad store fails before any replica starts
                docs = open_store(spec.input_path, glob=spec.glob, id_column=spec.id_column,
                                  text_column=spec.text_column, limit=spec.limit,
                                  columns=route_columns(spec.run))
            except BaseException as exc:
                state.end_run(run_id, "failed", note=_error_note(exc))
                raise
            skipped = 0

            def todo() -> Iterator[Document]:
                nonlocal skipped
                for doc in docs:
                    if doc.error is None and state.is_done(doc.doc_id, doc.content_hash, fingerprint):
                        skipped += 1
                        continue
                    yield doc

            log = RequestLog()
            cached, on_result = log.hooks(state.cached, state.store_result)
            part = _child(state.dir, f"part-{run_id:05d}.parquet")
            tmp = _child(state.dir, f".part-{run_id:05d}.parquet.inprogress")
            try:
                if pool is None and engine is not None:
                    with open_pool(spec.run, engine=engine) as p:
                        stats, replicas = run_documents(spec.run, todo(), str(tmp), pool=p,
                                                        on_progress=on_progress,
                                                        cached=cached, on_result=on_result)
                else:
                    stats, replicas = run_documents(spec.run, todo(), str(tmp), pool=pool,
                                                    on_progress=on_progress,
                                                    cached=cached, on_result=on_result)
            except BaseException as exc:
                state.end_run(run_id, "failed", num_skipped=skipped, note=_error_note(exc))
                raise
            retries = max((r.get("num_retried_requests", 0) for r in replicas), default=0)
            published = None
            if lease is not None:  # a run whose lease was taken over must not publish
                try:
                    lease.check()
                except BaseException as exc:
                    state.end_run(run_id, "failed", num_skipped=skipped, note=_error_note(exc))
                    raise
            if stats.num_docs:  # the request log first: the ledger entry commits the run
                log.write(_child(state.dir, f"_requests/run-{run_id:05d}.arrow"), replicas,
                          stats.wall_s)
                state.publish(run_id, tmp, part, fingerprint)
                published = part
            elif isinstance(tmp, Location):
                tmp.delete()
            else:
                tmp.unlink(missing_ok=True)
            state.end_run(
                run_id, "ok" if not stats.num_failed else "ok-with-errors",
                num_done=stats.num_ok, num_skipped=skipped, num_failed=stats.num_failed,
                num_retries=retries, num_cached_requests=stats.num_cached_requests,
                part=published.name if published else None,
            )
            return JobRunSummary(run_id, stats.num_ok, skipped, stats.num_failed, retries,
                                 stats.num_cached_requests, stats.num_requests, published, stats.wall_s)
        finally:
            state.close()


def _error_note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _child(directory: Path | Location, name: str) -> Path | Location:
    return directory.join(name) if isinstance(directory, Location) else directory / name


def _remove_leftovers(output_dir: Path | Location) -> None:
    """Called with the lock held and after `recover()`: no run is writing here, and every
    publish a killed run began is finished, so remaining in-progress parts are orphans."""
    if isinstance(output_dir, Location):
        # no pids to check across machines: with the lock held, every hidden temporary
        # object and in-progress part at the top level is a killed run's
        for obj in output_dir.files(recursive=False):
            if obj.name.startswith(".") and (".tmp-" in obj.name or ".inprogress" in obj.name):
                logger.info("removing %s, left by a killed run", obj)
                obj.delete()
        return
    remove_stale_tmp_files(output_dir)
    # (the second pattern: the in-progress name before 0.2)
    for pattern in (".part-*.parquet.inprogress", ".part-*.inprogress.parquet"):
        for path in output_dir.glob(pattern):
            logger.info("removing %s, left by a killed run", path)
            path.unlink(missing_ok=True)


def read_dataset(output_dir: Path | str):
    """The job's current dataset as one pyarrow Table (all parts); a URI reads its objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = open_local_or_remote(output_dir)
    if isinstance(where, Location):
        parts = [p for p in where.files(recursive=False)
                 if p.name.startswith("part-") and p.name.endswith(".parquet")]
        tables = [pq.read_table(p.path, filesystem=p.fs) for p in parts]
        if not tables:
            from pipeline.output import OUTPUT_SCHEMA

            return OUTPUT_SCHEMA.empty_table()
        return pa.concat_tables(tables, promote_options="default")
    parts = sorted(where.glob("part-*.parquet"))
    if not parts:
        from pipeline.output import OUTPUT_SCHEMA

        return OUTPUT_SCHEMA.empty_table()
    # parts written before a column existed read it as nulls
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
