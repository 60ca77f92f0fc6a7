"""The bad-input corpus: every case ends in an error row or a correct output, never a crash
of the run and never a lost neighbour."""

import json
import os
import resource

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.runner import read_dataset, run_job
from pipeline.config import RunConfig
from pipeline.service import run_documents
from pipeline.stores import open_store
from tests.fakes import EchoPool
from tests.jobs.test_jobs import make_job

GOOD = "The harpooneer slept soundly. " * 30


def rows_by_id(out):
    return {r["doc_id"]: r for r in read_dataset(out).to_pylist()}


def test_text_store_corpus(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "good1.txt").write_text(GOOD)
    (store / "empty.txt").write_text("")
    (store / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (store / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (store / "one-line.txt").write_text("x" * 1_000_000)  # 1M chars, no boundaries at all
    (store / "good2.md").write_text(GOOD + "\n\nThe end.")
    spec = make_job(tmp_path, tiny_model_dir, store=store)
    summary = run_job(spec)
    rows = rows_by_id(spec.output_dir)
    assert set(rows) == {"good1.txt", "empty.txt", "binary.txt", "latin1.txt", "one-line.txt",
                         "good2.md"}
    for ok in ("good1.txt", "good2.md", "one-line.txt"):
        assert rows[ok]["status"] == "ok", rows[ok]["error"]
    assert rows["one-line.txt"]["num_chunks"] > 100
    for bad, word in [("empty.txt", "empty"), ("binary.txt", "binary"), ("latin1.txt", "UTF-8")]:
        assert rows[bad]["status"] == "error" and word in rows[bad]["error"], rows[bad]["error"]
    assert summary.num_failed == 3


def test_jsonl_and_parquet_corpus(tiny_model_dir, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"id": "a", "text": GOOD}),
        "{this is not json",
        json.dumps({"id": "b", "text": None}),
        json.dumps({"id": "a", "text": "duplicate id"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "c", "text": GOOD + " More."}),
    ]) + "\n")
    spec = make_job(tmp_path, tiny_model_dir, store=jsonl)
    run_job(spec)
    rows = rows_by_id(spec.output_dir)
    assert len(rows) == 6
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"
    assert sum(r["status"] == "error" for r in rows.values()) == 4
    assert any("duplicate doc_id 'a'" in (r["error"] or "") for r in rows.values())

    pdir = tmp_path / "pq"
    pdir.mkdir()
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": [GOOD, None]}), pdir / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   pdir / "empty.parquet")
    pq.write_table(pa.table({"id": ["q"], "body": [GOOD]}), pdir / "no-text-column.parquet")
    (tmp_path / "p").mkdir()
    pspec = make_job(tmp_path / "p", tiny_model_dir, store=pdir)
    run_job(pspec)
    prow = rows_by_id(pspec.output_dir)
    assert prow["p1"]["status"] == "ok"
    assert prow["p2"]["status"] == "error" and "null" in prow["p2"]["error"]
    assert prow["no-text-column.parquet:*"]["status"] == "error"
    assert "--text-column" in prow["no-text-column.parquet:*"]["error"]
    assert len(prow) == 3  # the empty file has no documents


def test_doc_ids_cannot_escape_the_output_directory(tiny_model_dir, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"id": "../../escape", "text": GOOD}) + "\n"
                     + json.dumps({"id": "/etc/passwd", "text": GOOD}) + "\n")
    spec = make_job(tmp_path, tiny_model_dir, store=jsonl)
    run_job(spec)
    assert set(rows_by_id(spec.output_dir)) == {"../../escape", "/etc/passwd"}
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written <= {"docs.jsonl", "out", "job.toml"}
    assert not (tmp_path.parent / "escape").exists()


def test_one_million_token_document(tmp_path):
    text = ("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. "
            * 60_000)
    (tmp_path / "big.txt").write_text(text)
    config = RunConfig(model="smollm2-135m-instruct", use_ray=False)
    pool = EchoPool()
    stats, _ = run_documents(config, open_store(tmp_path / "big.txt"), tmp_path / "o.parquet", pool=pool)
    (row,) = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert row["status"] == "ok" and row["num_tokens"] >= 1_000_000
    assert row["num_chunks"] == len(row["chunks"]) >= 500
    assert stats.num_ok == 1


def test_ten_million_token_store_streams_with_flat_memory(tmp_path):
    """100 documents of ~100K tokens; only max_inflight_docs are held at once."""
    base = open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data",
                             "moby-dick-100k.txt")).read()
    store = tmp_path / "store"
    store.mkdir()
    for i in range(100):
        (store / f"d{i:03d}.txt").write_text(f"Copy {i}.\n" + base)
    config = RunConfig(model="smollm2-135m-instruct", use_ray=False, max_inflight_docs=4)
    pool = EchoPool()

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    docs = open_store(store)
    # warm up on the first documents, then measure growth over the rest
    stats, _ = run_documents(config, (d for _, d in zip(range(8), docs)), tmp_path / "warm.parquet", pool=pool)
    before = rss_mib()
    stats, _ = run_documents(config, docs, tmp_path / "o.parquet", pool=pool)
    growth = rss_mib() - before
    assert stats.num_ok == 92 and stats.num_tokens >= 9_000_000
    assert growth < 150, f"peak RSS grew by {growth:.0f} MiB while streaming"
