"""The pipeline end to end on a tiny random model, in process (no Ray)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.output import read_results
from pipeline.service import open_pool, run_documents
from pipeline.stores import Document, content_hash, open_store
from workers.host import EngineSpec, build_engine


def _config(model_dir, **kw) -> RunConfig:
    base = dict(model=str(model_dir), dtype="float32", use_ray=False, max_summary_tokens=8,
                context_summary_tokens=4, max_num_batched_tokens=4096)
    base.update(kw)
    return RunConfig(**base)


def _doc(doc_id, text):
    return Document(doc_id, f"mem:{doc_id}", text, content_hash(text))


def _run(config, docs, out, fmt="parquet"):
    stats, _ = run_documents(config, docs, out, fmt)
    return stats, read_results(out, fmt)


class RecordingPool:
    """Wraps a pool and records every prompt it is sent."""

    def __init__(self, pool):
        self.pool = pool
        self.prompt_lengths = []
        self.requests = []

    def submit(self, requests):
        for r in requests:
            self.prompt_lengths.append(len(r.prompt_token_ids) + r.sampling["max_tokens"])
            self.requests.append(r)
        self.pool.submit(requests)

    def __getattr__(self, name):
        return getattr(self.pool, name)


# Chunk sizes keep each case to seconds on the byte-level tiny model (4 bytes per cl100k token).
@pytest.mark.parametrize("strategy, chunk_tokens", [("map-reduce", 1024), ("overlap-summary", 2048),
                                                    ("refine", 4096)])
def test_every_strategy_on_a_100k_token_document(tiny_model_dir, long_text, tmp_path, strategy, chunk_tokens):
    config = _config(tiny_model_dir, strategy=strategy, chunk_tokens=chunk_tokens, overlap=128)
    stats, rows = _run(config, [_doc("moby", long_text)], tmp_path / "out.parquet")
    assert stats.num_failed == 0, stats.errors
    (row,) = rows
    assert row["status"] == "ok" and row["summary"] is not None
    assert row["num_tokens"] >= 99_000
    assert row["num_chunks"] == len(row["chunks"]) >= 100_000 // chunk_tokens
    chunks = row["chunks"]
    assert chunks[0]["char_start"] == 0 and chunks[-1]["char_end"] == len(long_text)
    for a, b in zip(chunks, chunks[1:]):
        assert b["char_start"] <= a["char_end"], "gap between chunks"
    assert all(c["output"] is not None for c in chunks)
    assert row["generated_tokens"] > 0 and row["prompt_tokens"] > row["num_tokens"]


def test_merge_never_exceeds_the_context(tiny_small_ctx_dir, long_text, tmp_path):
    config = _config(tiny_small_ctx_dir, chunk_tokens=128, overlap=16, max_summary_tokens=48)
    text = long_text[:40_000]
    spec = EngineSpec(model=config.model, dtype="float32")
    engine, _ = build_engine(spec)
    with open_pool(config, engine=engine) as pool:
        recorder = RecordingPool(pool)
        stats, _ = run_documents(config, [_doc("d", text)], tmp_path / "o.parquet", pool=recorder)
    assert stats.num_failed == 0, stats.errors
    assert max(recorder.prompt_lengths) <= 1024
    assert stats.num_truncated_prompts == 0  # the merge grouped pieces to fit, nothing was cut
    stages = {r.request_id.split("/")[1] for r in recorder.requests}
    assert {"reduce1", "reduce2"} <= stages, f"expected a multi-level merge, got {stages}"


def _write_store(kind, tmp_path, docs):
    if kind == "dir":
        root = tmp_path / "store"
        root.mkdir()
        for doc_id, text in docs:
            (root / f"{doc_id}.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
        return root
    if kind == "jsonl":
        path = tmp_path / "store.jsonl"
        lines = []
        for doc_id, text in docs:
            lines.append("{not json" if isinstance(text, bytes) else json.dumps({"id": doc_id, "text": text}))
        path.write_text("\n".join(lines) + "\n")
        return path
    path = tmp_path / "store.parquet"
    pq.write_table(pa.table({
        "id": [d for d, _ in docs],
        "text": [None if isinstance(t, bytes) else t for _, t in docs],
    }), path)
    return path


@pytest.mark.parametrize("kind", ["dir", "jsonl", "parquet"])
def test_one_row_per_document_with_a_failing_one(tiny_model_dir, tmp_path, kind):
    good = "The whale surfaced near the ship. " * 40
    docs = [("a", good), ("b", b"\xff\xfe\x00bad"), ("c", good + " The end."), ("d", "Short text.")]
    store = _write_store(kind, tmp_path, docs)
    config = _config(tiny_model_dir, chunk_tokens=128, overlap=16)
    stats, rows = _run(config, open_store(store), tmp_path / "out.parquet")
    assert len(rows) == 4 and len({r["doc_id"] for r in rows}) == 4
    by_status = sorted(r["status"] for r in rows)
    assert by_status == ["error", "ok", "ok", "ok"]
    bad = next(r for r in rows if r["status"] == "error")
    assert bad["error"] and bad["summary"] is None
    assert stats.num_failed == 1


def test_jsonl_output_and_moe_expert_tokens(tiny_moe_dir, tmp_path):
    config = _config(tiny_moe_dir, chunk_tokens=128, overlap=16)
    stats, rows = _run(config, [_doc("x", "Call me Ishmael. " * 60)], tmp_path / "o.jsonl", "jsonl")
    (row,) = rows
    assert row["status"] == "ok"
    assert row["expert_tokens"] is not None and len(row["expert_tokens"]) == 4
    # top-2 routing over 2 MoE layers: every computed token is counted 4 times
    assert sum(row["expert_tokens"]) % 4 == 0 and sum(row["expert_tokens"]) > 0


def test_same_input_same_fingerprint_same_output(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, chunk_tokens=128, overlap=16)
    docs = [_doc("x", "It was the best of times. " * 50)]
    _, a = _run(config, docs, tmp_path / "a.parquet")
    _, b = _run(config, docs, tmp_path / "b.parquet")
    assert a[0]["summary"] == b[0]["summary"]
    assert a[0]["config_fingerprint"] == b[0]["config_fingerprint"]
    other = _config(tiny_model_dir, chunk_tokens=128, overlap=16, task="List the names.")
    _, c = _run(other, docs, tmp_path / "c.parquet")
    assert c[0]["config_fingerprint"] != a[0]["config_fingerprint"]
