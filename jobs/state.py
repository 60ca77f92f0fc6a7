"""A job's durable state: stored request results, the document index, the run ledger.

One SQLite database per output directory (`_state.sqlite`, WAL mode). What it holds:

- `results`: every completed model request, keyed by its deterministic request id
  (doc id, content hash, config fingerprint, stage, index). Written as each result arrives,
  so a killed run loses at most the requests in flight; a rerun serves the rest from here.
- `docs`: per document id, the content hash, fingerprint, status and the Parquet part that
  holds its current row, by file name relative to the output directory (so a moved or copied
  directory keeps working and a copy never touches the original's files; absolute paths
  written by older versions are read by their file name). A document is skipped when its (id, hash, fingerprint) has an `ok`
  row; changed documents and error rows are redone.
- `runs`: the ledger (run id, start, end, documents done/skipped/failed, retries, status).
- `publish`: a part being published. Publishing is: write the run's rows to a temporary
  file; record the intent; rewrite older parts without the rows the run superseded; rename
  the temporary file into place; update `docs`. A crash at any point is finished by
  `recover()` on the next start, so the dataset never holds a document twice.

Every file a dataset reader must not see starts with `_` or `.` (`_state.sqlite`,
`_ledger.jsonl`, `.part-*.inprogress.parquet`, rewrites in progress), so pyarrow, DuckDB or
Spark open the output directory as a dataset of exactly one row per document.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.fs import as_local_or_uri, is_uri
from workers.host import WorkResult

LEDGER_NAME = "_ledger.jsonl"
OLD_LEDGER_NAME = "ledger.jsonl"  # before 0.2: readers of the directory as a dataset choked on it

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (request_id TEXT PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    doc_id TEXT PRIMARY KEY, content_hash TEXT, fingerprint TEXT, status TEXT, part TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY, started REAL, ended REAL, status TEXT,
    num_done INTEGER DEFAULT 0, num_skipped INTEGER DEFAULT 0, num_failed INTEGER DEFAULT 0,
    num_retries INTEGER DEFAULT 0, num_cached_requests INTEGER DEFAULT 0, part TEXT, note TEXT);
CREATE TABLE IF NOT EXISTS publish (run_id INTEGER PRIMARY KEY, tmp TEXT, part TEXT, fingerprint TEXT);
CREATE TABLE IF NOT EXISTS schedule (job TEXT PRIMARY KEY, last_tick REAL);
"""


class JobState:
    """`JobState(dir)` for a local directory; `JobState("s3://...")` is a RemoteJobState
    (jobs.remote_state): the same tables, rebuilt from objects beside the output."""

    def __new__(cls, output_dir=None, *args, **kwargs):
        if cls is JobState and isinstance(output_dir, str) and is_uri(output_dir) \
                and not isinstance(as_local_or_uri(output_dir), Path):
            from jobs.remote_state import RemoteJobState

            return super().__new__(RemoteJobState)
        return super().__new__(cls)

    def __init__(self, output_dir: Path) -> None:
        output_dir = as_local_or_uri(output_dir)
        self.dir = output_dir
        self.db = sqlite3.connect(output_dir / "_state.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process kills
        self.db.executescript(SCHEMA)
        self._migrate_ledger()

    def _migrate_ledger(self) -> None:
        old, new = self.dir / OLD_LEDGER_NAME, self.dir / LEDGER_NAME
        if old.exists():
            # The DB is the ledger's source of truth; the file is its export under a new name.
            if new.exists():
                old.unlink()
            else:
                os.replace(old, new)

    def path_of(self, stored: str) -> Path:
        """A part as stored in the DB -> its path in this output directory."""
        return self.dir / Path(stored).name

    def close(self) -> None:
        self.db.close()

    # -- request results (resume) -----------------------------------------------------------
    def cached(self, request_id: str) -> WorkResult | None:
        row = self.db.execute("SELECT payload FROM results WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else WorkResult(**json.loads(row[0]))

    def store_result(self, doc, request, result: WorkResult) -> None:
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)",
                        (result.request_id, json.dumps(result.to_dict())))

    def num_results(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- documents --------------------------------------------------------------------------
    def is_done(self, doc_id: str, content_hash: str, fingerprint: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM docs WHERE doc_id=? AND content_hash=? AND fingerprint=? AND status='ok'",
            (doc_id, content_hash, fingerprint),
        ).fetchone()
        return row is not None

    # -- ledger -----------------------------------------------------------------------------
    def begin_run(self) -> int:
        cur = self.db.execute("INSERT INTO runs (started, status) VALUES (?, 'running')", (time.time(),))
        return int(cur.lastrowid)

    def end_run(self, run_id: int, status: str, **counts) -> None:
        sets = ", ".join(f"{k}=?" for k in counts)
        self.db.execute(f"UPDATE runs SET ended=?, status=?{', ' if sets else ''}{sets} WHERE run_id=?",
                        (time.time(), status, *counts.values(), run_id))
        self.export_ledger()

    def last_run_id(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(run_id), 0) FROM runs").fetchone()[0]

    def record_failure(self, *, after_run_id: int, note: str) -> int:
        """Make sure the ledger shows a failed run after `after_run_id`, with `note`: the
        run's own entry when it made one (kept if it already says failed), else a new one."""
        row = self.db.execute("SELECT run_id, status, note FROM runs WHERE run_id > ? "
                              "ORDER BY run_id DESC LIMIT 1", (after_run_id,)).fetchone()
        if row is None:
            run_id = self.begin_run()
        elif row[1] == "failed" and row[2]:
            return row[0]
        else:
            run_id = row[0]
        self.end_run(run_id, "failed", note=note[:2000])
        return run_id

    def mark_interrupted_runs(self) -> None:
        """Runs still 'running' at start-up were killed."""
        self.db.execute("UPDATE runs SET status='killed' WHERE status='running'")

    def ledger(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY run_id")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def export_ledger(self) -> None:
        tmp = self.dir / f"{LEDGER_NAME}.tmp-{os.getpid()}"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.ledger()))
        os.replace(tmp, self.dir / LEDGER_NAME)

    # -- publishing parts -------------------------------------------------------------------
    def publish(self, run_id: int, tmp: Path, part: Path, fingerprint: str) -> None:
        assert tmp.parent == part.parent == self.dir, "parts live in the output directory"
        self.db.execute("INSERT OR REPLACE INTO publish VALUES (?, ?, ?, ?)",
                        (run_id, tmp.name, part.name, fingerprint))
        self._finish_publish(run_id, tmp, part, fingerprint)

    def recover(self) -> None:
        self.mark_interrupted_runs()
        for run_id, tmp, part, fingerprint in self.db.execute("SELECT * FROM publish").fetchall():
            self._finish_publish(run_id, self.path_of(tmp), self.path_of(part), fingerprint)

    def _finish_publish(self, run_id: int, tmp, part, fingerprint: str) -> None:
        if not tmp.exists() and not part.exists():
            # Killed after the intent was recorded but the files are gone (removed by hand):
            # nothing to publish.
            self.db.execute("DELETE FROM publish WHERE run_id=?", (run_id,))
            self._publish_done(run_id)
            return
        source = tmp if tmp.exists() else part
        table = self._read_parquet(source, ["doc_id", "status", "content_hash"])
        rows = table.to_pylist()
        new_ids = {r["doc_id"] for r in rows}
        # Older parts holding rows this run superseded: rewrite them without those rows.
        olds: dict[str, set[str]] = {}
        for doc_id in new_ids:
            hit = self.db.execute("SELECT part FROM docs WHERE doc_id=?", (doc_id,)).fetchone()
            if hit and hit[0] and Path(hit[0]).name != part.name:
                olds.setdefault(Path(hit[0]).name, set()).add(doc_id)
        for old, ids in olds.items():
            self._drop_rows(old, ids)
        if tmp.exists():
            self._move(tmp, part)
        self.db.execute("BEGIN")
        for r in rows:
            self.db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?)",
                            (r["doc_id"], r["content_hash"], fingerprint, r["status"], part.name))
        self.db.execute("DELETE FROM publish WHERE run_id=?", (run_id,))
        self.db.execute("COMMIT")
        self._publish_done(run_id)

    # the file operations of a publish (RemoteJobState does them on objects)
    def _read_parquet(self, path, columns: list[str]):
        return pq.read_table(path, columns=columns)

    def _drop_rows(self, name: str, doc_ids: set[str]) -> None:
        _drop_rows(self.dir / name, doc_ids)

    def _move(self, tmp, part) -> None:
        os.replace(tmp, part)

    def _publish_done(self, run_id: int) -> None:
        pass

    # -- schedules --------------------------------------------------------------------------
    def last_tick(self, job: str) -> float | None:
        row = self.db.execute("SELECT last_tick FROM schedule WHERE job=?", (job,)).fetchone()
        return None if row is None else row[0]

    def set_last_tick(self, job: str, tick: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO schedule VALUES (?, ?)", (job, tick))


def _drop_rows(path: Path, doc_ids: set[str]) -> None:
    """Rewrite a Parquet part without `doc_ids` (atomically); delete it if nothing is left."""
    if not path.exists():
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pq.read_table(path)
    keep = pc.invert(pc.is_in(table["doc_id"], value_set=pa.array(sorted(doc_ids), pa.string())))
    kept = table.filter(keep)
    if kept.num_rows == table.num_rows:
        return
    if kept.num_rows == 0:
        path.unlink()
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden from dataset readers
    pq.write_table(kept, tmp)
    os.replace(tmp, path)
