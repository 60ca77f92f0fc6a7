"""A job's state when its output directory is a URI (`s3://bucket/jobs/nightly`).

SQLite cannot live on an object store (no locks, no in-place writes), so the objects beside
the output are the source of truth, and the SQLite database is a private, local copy rebuilt
from them each time the state is opened (a temporary file in the job's cache directory,
removed on close), never synced back as a file:

    s3://bucket/jobs/nightly/
      part-00001.parquet ...          the dataset; the `docs` table is rebuilt from the parts'
                                      doc_id, content_hash, config_fingerprint, status
      _ledger.jsonl                   the `runs` table; rewritten when a run begins and ends
      _state/results/<run>-<pid>-<rand>-<seq>.jsonl
                                      stored request results, appended as segments (new
                                      objects, never rewritten) every 32 results or 1 s
      _state/publish-<run>.json       a publish in progress (the intent), deleted when done
      _state/schedule.json            the scheduler's last ticks

Why rebuild rather than cache a SQLite file keyed by the URI and mirror it: a mirrored DB
file is rewritten whole on every change (the results table grows to every request of the
job), and a local cache goes stale when the job runs on another machine; rebuilt from
objects, any machine resumes any job and nothing local needs to survive. The cost: a killed
run may redo the results of its last second (up to 32), besides those in flight; a resume
reads every segment (small JSON lines; benchmarks/resume.py-sized jobs: a few MB).

Atomicity without rename: every object is written whole or not at all (a completed upload;
`move` is a server-side copy). Rows are written to the hidden `.part-<run>.parquet.inprogress`;
publishing records the intent, rewrites older parts without the superseded rows (each via a
hidden temporary object), moves the new part into place, deletes the intent, and the
ledger entry written last commits the run. A killed publish is finished by `recover()`.
A reader never sees a partial object; during the few moves of a publish it may miss the
superseded rows of redone documents (never see a document twice).

Locking: a local `flock` in the job's cache directory keeps two runs on one machine apart;
on S3 a lease object (`_state/lock.json`, taken and renewed with conditional writes:
jobs.remote_lock) keeps runs on different machines apart, and a run that lost its lease does
not publish. `_rebuild` skips the lease object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.state import LEDGER_NAME, SCHEMA, JobState
from pipeline.fs import Location, location, unique_token

logger = logging.getLogger(__name__)

STATE_PREFIX = "_state"
FLUSH_RESULTS = 32
FLUSH_SECONDS = 1.0


def job_cache_dir(uri: str) -> Path:
    """The local directory of a remote job (its lock and its rebuilt DB), keyed by the URI."""
    root = Path(os.environ.get("DOCPIPE_JOB_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "docpipe" / "jobs")
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    path = root / key
    path.mkdir(parents=True, exist_ok=True)
    return path


class RemoteJobState(JobState):
    """JobState whose tables are rebuilt from, and written through to, objects beside the
    output (module docstring)."""

    def __init__(self, output_dir: str) -> None:
        self.loc = location(output_dir)
        self.dir = self.loc
        self.state = self.loc.join(STATE_PREFIX)
        self.cache = job_cache_dir(self.loc.uri)
        self.db_path = self.cache / f"state-{unique_token()}.sqlite"
        self.db = sqlite3.connect(self.db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")  # a scratch copy: the objects are the truth
        self.db.executescript(SCHEMA)
        self._segment = f"00000-{unique_token()}"
        self._seq = 0
        self._buffer: list[str] = []
        self._last_flush = time.monotonic()
        self._rebuild()

    # -- rebuild ----------------------------------------------------------------------------
    def _rebuild(self) -> None:
        t0 = time.perf_counter()
        db = self.db
        db.execute("BEGIN")
        ledger = self.loc.join(LEDGER_NAME)
        top = {p.name: p for p in self.loc.files(recursive=False)}
        if LEDGER_NAME in top:
            cols = [c[1] for c in db.execute("PRAGMA table_info(runs)")]
            for line in ledger.read_bytes().decode().splitlines():
                if line.strip():
                    r = json.loads(line)
                    db.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(cols))})",
                               [r.get(c) for c in cols])
        for name in sorted(n for n in top if n.startswith("part-") and n.endswith(".parquet")):
            table = self._read_parquet(top[name], ["doc_id", "content_hash", "config_fingerprint",
                                                   "status"])
            for r in table.to_pylist():
                db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?)",
                           (r["doc_id"], r["content_hash"], r["config_fingerprint"], r["status"], name))
        num_results = 0
        for obj in self.state.files():
            rel = obj.relative_to(self.state).as_posix()
            if rel.startswith("results/") and rel.endswith(".jsonl"):
                for line in obj.read_bytes().decode().splitlines():
                    if line.strip():
                        payload = json.loads(line)
                        db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)",
                                   (payload["request_id"], line))
                        num_results += 1
            elif rel.startswith("publish-") and rel.endswith(".json"):
                p = json.loads(obj.read_bytes())
                db.execute("INSERT OR REPLACE INTO publish VALUES (?, ?, ?, ?)",
                           (p["run_id"], p["tmp"], p["part"], p["fingerprint"]))
            elif rel == "schedule.json":
                for job, tick in json.loads(obj.read_bytes()).items():
                    db.execute("INSERT OR REPLACE INTO schedule VALUES (?, ?)", (job, tick))
        db.execute("COMMIT")
        logger.info("%s: state rebuilt from its objects (%d stored results) in %.2f s",
                    self.loc.uri, num_results, time.perf_counter() - t0)

    def close(self) -> None:
        try:
            self.flush_results()
        finally:
            self.db.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)

    def _migrate_ledger(self) -> None:
        pass  # URIs are new: no directory from before _ledger.jsonl

    def path_of(self, stored: str) -> Location:
        return self.loc.join(Path(stored).name)

    # -- results: appended as segments ------------------------------------------------------
    def store_result(self, doc, request, result) -> None:
        payload = json.dumps(result.to_dict())
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (result.request_id, payload))
        self._buffer.append(payload)
        if len(self._buffer) >= FLUSH_RESULTS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush_results()

    def flush_results(self) -> None:
        """Write the buffered results as one new segment object (whole or not at all)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        self._seq += 1
        obj = self.state.join(f"results/{self._segment}-{self._seq:06d}.jsonl")
        with obj.open_write() as f:
            f.write(("\n".join(self._buffer) + "\n").encode())
        self._buffer.clear()

    # -- ledger -----------------------------------------------------------------------------
    def begin_run(self) -> int:
        run_id = super().begin_run()
        self._segment = f"{run_id:05d}-{unique_token()}"
        self.export_ledger()  # a killed run shows in the ledger, and its id is never reused
        return run_id

    def end_run(self, run_id: int, status: str, **counts) -> None:
        self.flush_results()
        super().end_run(run_id, status, **counts)

    def export_ledger(self) -> None:
        data = "".join(json.dumps(r) + "\n" for r in self.ledger()).encode()
        self.loc.join(LEDGER_NAME).write_bytes(data)

    def set_last_tick(self, job: str, tick: float) -> None:
        super().set_last_tick(job, tick)
        ticks = dict(self.db.execute("SELECT job, last_tick FROM schedule").fetchall())
        self.state.join("schedule.json").write_bytes(json.dumps(ticks).encode())

    # -- publishing -------------------------------------------------------------------------
    def publish(self, run_id: int, tmp: Location, part: Location, fingerprint: str) -> None:
        assert tmp.parent.uri == part.parent.uri == self.loc.uri, "parts live in the output directory"
        self.flush_results()
        intent = dict(run_id=run_id, tmp=tmp.name, part=part.name, fingerprint=fingerprint)
        self.state.join(f"publish-{run_id:05d}.json").write_bytes(json.dumps(intent).encode())
        self.db.execute("INSERT OR REPLACE INTO publish VALUES (?, ?, ?, ?)",
                        (run_id, tmp.name, part.name, fingerprint))
        self._finish_publish(run_id, tmp, part, fingerprint)

    def _read_parquet(self, path: Location, columns: list[str]):
        return pq.read_table(path.path, filesystem=path.fs, columns=columns)

    def _drop_rows(self, name: str, doc_ids: set[str]) -> None:
        path = self.loc.join(name)
        if not path.exists():
            return
        table = pq.read_table(path.path, filesystem=path.fs)
        keep = pc.invert(pc.is_in(table["doc_id"], value_set=pa.array(sorted(doc_ids), pa.string())))
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            return
        if kept.num_rows == 0:
            path.delete()
            return
        tmp = path.with_name(f".{path.name}.tmp-{unique_token()}")  # hidden from dataset readers
        pq.write_table(kept, tmp.path, filesystem=tmp.fs)
        tmp.move_to(path)

    def _move(self, tmp: Location, part: Location) -> None:
        tmp.move_to(part)

    def _publish_done(self, run_id: int) -> None:
        self.state.join(f"publish-{run_id:05d}.json").delete()
