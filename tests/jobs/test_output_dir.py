"""The job output directory as other tools see it: a Parquet dataset of one row per document
that any reader opens, which can be moved or copied, and which a killed run leaves clean."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from jobs.runner import read_dataset, run_job
from jobs.state import JobState
from pipeline.config import RunConfig
from pipeline.output import ResultWriter
from tests.fakes import EchoPool
from tests.jobs.test_jobs import make_job


def doc_ids(table):
    return sorted(table.column("doc_id").to_pylist())


def run(spec):
    return run_job(spec, pool=EchoPool())


def snapshot(directory):
    """Every file's bytes and mtime, by name."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir()) if p.is_file()}


def test_output_dir_reads_as_one_row_per_document(tiny_model_dir, tmp_path):
    import duckdb

    spec = make_job(tmp_path, tiny_model_dir)
    run(spec)
    # a changed document: the rerun's part holds its new row, the old part loses the old one
    (spec.input_path / "doc2.txt").write_text("Changed. " * 40)
    assert run(spec).num_done == 1
    out = spec.output_dir
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00001.parquet",
                                                             "part-00002.parquet"]
    expected = [f"doc{i}.txt" for i in range(5)]
    assert doc_ids(ds.dataset(out, format="parquet").to_table()) == expected
    assert doc_ids(pq.read_table(out)) == expected
    rows = duckdb.sql(f"SELECT doc_id, summary FROM read_parquet('{out}/*.parquet') "
                      "ORDER BY doc_id").fetchall()
    assert [r[0] for r in rows] == expected
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}')").fetchall() == [(5,)]
    # the row a reader sees for the changed document is the new one
    changed = read_dataset(out).filter(ds.field("doc_id") == "doc2.txt").to_pylist()
    assert dict(rows)["doc2.txt"] == changed[0]["summary"]
    assert (out / "_ledger.jsonl").read_text().count("\n") == 2
    assert not (out / "ledger.jsonl").exists()


def test_old_ledger_file_is_renamed(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    run(spec)
    out = spec.output_dir
    os.replace(out / "_ledger.jsonl", out / "ledger.jsonl")  # as docpipe 0.1 left it
    run(spec)
    assert not (out / "ledger.jsonl").exists()
    assert (out / "_ledger.jsonl").read_text().count("\n") == 2
    assert doc_ids(ds.dataset(out, format="parquet").to_table()) == [f"doc{i}.txt" for i in range(5)]


def test_moved_output_dir_redoes_nothing_and_keeps_one_row_each(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    run(spec)
    moved = tmp_path / "elsewhere" / "out"
    moved.parent.mkdir()
    shutil.move(spec.output_dir, moved)
    spec = dataclasses.replace(spec, output_dir=moved)
    again = run(spec)
    assert (again.num_done, again.num_skipped, again.num_requests) == (0, 5, 0)
    (spec.input_path / "doc2.txt").write_text("Changed. " * 40)
    assert run(spec).num_done == 1
    assert doc_ids(ds.dataset(moved, format="parquet").to_table()) == [f"doc{i}.txt" for i in range(5)]
    state = JobState(moved)
    parts = [r[0] for r in state.db.execute("SELECT part FROM docs")]
    state.close()
    assert sorted(set(parts)) == ["part-00001.parquet", "part-00003.parquet"]  # names, not paths


def test_copied_output_dir_never_touches_the_original(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    run(spec)
    original = spec.output_dir
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = snapshot(original)
    (spec.input_path / "doc2.txt").write_text("Changed. " * 40)
    summary = run(dataclasses.replace(spec, output_dir=copy))
    assert summary.num_done == 1
    assert snapshot(original) == before  # no part rewritten, deleted or added
    assert doc_ids(ds.dataset(copy, format="parquet").to_table()) == [f"doc{i}.txt" for i in range(5)]
    old = {r["doc_id"]: r["content_hash"] for r in read_dataset(original).to_pylist()}
    new = {r["doc_id"]: r["content_hash"] for r in read_dataset(copy).to_pylist()}
    assert [d for d in old if old[d] != new[d]] == ["doc2.txt"]


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_stale_temporary_files_are_removed_at_start(tiny_model_dir, tmp_path):
    spec = make_job(tmp_path, tiny_model_dir)
    out = spec.output_dir
    out.mkdir(parents=True)
    gone = dead_pid()
    stale = [out / f".part-00007.parquet.inprogress.tmp-{gone}", out / f"_ledger.jsonl.tmp-{gone}",
             out / f".part-00001.parquet.tmp-{gone}"]
    orphan = out / ".part-00007.parquet.inprogress"  # written, never published
    for p in [*stale, orphan]:
        p.write_bytes(b"left by a killed run")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".notes.txt.tmp-{alive.pid}"
        live.write_bytes(b"another process is writing this")
        assert run(spec).num_done == 5
        assert not any(p.exists() for p in [*stale, orphan])
        assert live.exists()
    finally:
        alive.kill()
        alive.wait()
    assert doc_ids(ds.dataset(out, format="parquet").to_table()) == [f"doc{i}.txt" for i in range(5)]


def test_result_writer_removes_its_own_stale_temp_files(tmp_path):
    gone = dead_pid()
    stale = tmp_path / f"o.parquet.tmp-{gone}"
    other = tmp_path / f"p.parquet.tmp-{gone}"  # another output's: not this writer's business
    stale.write_bytes(b"x")
    other.write_bytes(b"x")
    RunConfig()  # the writer needs no model
    with ResultWriter(tmp_path / "o.parquet"):
        pass
    assert not stale.exists() and other.exists()
