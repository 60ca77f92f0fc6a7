import json
import os

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.output import (
    OUTPUT_SCHEMA,
    ChunkRow,
    DocResult,
    ResultWriter,
    error_row,
    read_results,
)
from pipeline.stores import Document, content_hash


def ok_result(doc_id: str, num_chunks: int = 2, **kw) -> DocResult:
    chunks = [ChunkRow(i, i * 100, i * 100 + 120, i * 400, i * 400 + 480, f"out {i} ✓")
              for i in range(num_chunks)]
    defaults = dict(
        source=f"store/{doc_id}.txt", summary=f"summary of {doc_id}", chunks=chunks,
        num_tokens=num_chunks * 100 + 20, num_chunks=num_chunks, model="tiny", strategy="map-reduce",
        config_fingerprint="f" * 16, content_hash=content_hash(doc_id), prompt_tokens=300,
        generated_tokens=40, cached_tokens=12, wall_s=1.25, expert_tokens=[3, 0, 5, 2],
    )
    defaults.update(kw)
    return DocResult(doc_id=doc_id, **defaults)


def failed_doc(doc_id: str = "bad.txt") -> Document:
    return Document(doc_id, f"store/{doc_id}", None, content_hash(b"\0"), {}, "store/bad.txt: binary")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_write_read_round_trip(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    results = [ok_result("a"), ok_result("b", num_chunks=0, expert_tokens=None),
               error_row(failed_doc(), "store/bad.txt: binary", model="tiny", strategy="refine")]
    with ResultWriter(path, fmt, flush_rows=2) as writer:
        for r in results:
            writer.write(r)
    assert writer.num_rows == 3
    rows = read_results(path)
    assert rows == [r.to_row() for r in results]
    assert list(rows[0]) == OUTPUT_SCHEMA.names
    assert rows[0]["chunks"][1] == {"index": 1, "token_start": 100, "token_end": 220,
                                    "char_start": 400, "char_end": 880, "output": "out 1 ✓",
                                    "pool": None, "model": None, "expert_tokens": None,
                                    "expert_tokens_per_layer": None}
    assert rows[1]["expert_tokens"] is None and rows[1]["chunks"] == []
    err = rows[2]
    assert (err["status"], err["error"], err["summary"]) == ("error", "store/bad.txt: binary", None)
    assert err["content_hash"] == content_hash(b"\0") and err["model"] == "tiny"
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp file left


def test_parquet_schema_matches(tmp_path):
    path = tmp_path / "out.parquet"
    with ResultWriter(path) as writer:
        writer.write(ok_result("a"))
    assert pq.read_schema(path).equals(OUTPUT_SCHEMA, check_metadata=False)
    assert pq.read_table(path).schema.field("chunks").type == OUTPUT_SCHEMA.field("chunks").type


def test_empty_output_has_the_schema(tmp_path):
    for fmt in ("parquet", "jsonl"):
        path = tmp_path / f"empty.{fmt}"
        with ResultWriter(path, fmt):
            pass
        assert read_results(path) == []
    assert pq.read_schema(tmp_path / "empty.parquet").equals(OUTPUT_SCHEMA, check_metadata=False)


def test_jsonl_rows_are_one_object_per_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultWriter(path, "jsonl") as writer:
        writer.write(ok_result("ü"))
    (line,) = path.read_text("utf-8").splitlines()
    assert json.loads(line)["doc_id"] == "ü"


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_crash_inside_with_leaves_nothing(tmp_path, fmt):
    path = tmp_path / "sub" / f"out.{fmt}"
    with pytest.raises(RuntimeError, match="boom"), ResultWriter(path, fmt, flush_rows=1) as w:
        w.write(ok_result("a"))
        w.write(ok_result("b"))  # flushed to the temp file already
        assert w.tmp_path.exists() and not path.exists()
        raise RuntimeError("boom")
    assert not path.exists()
    assert os.listdir(tmp_path / "sub") == []


def test_crash_keeps_a_previous_output(tmp_path):
    path = tmp_path / "out.parquet"
    with ResultWriter(path) as w:
        w.write(ok_result("old"))
    with pytest.raises(RuntimeError), ResultWriter(path) as w:
        w.write(ok_result("new"))
        raise RuntimeError("boom")
    assert [r["doc_id"] for r in read_results(path)] == ["old"]
    assert os.listdir(tmp_path) == ["out.parquet"]


def test_duplicate_doc_id_is_refused(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(AssertionError, match="duplicate doc_id 'a' written to .*out.parquet"):
        with ResultWriter(path) as w:
            w.write(ok_result("a"))
            w.write(ok_result("a"))
    assert not path.exists()


def test_row_that_does_not_fit_names_the_doc(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match="row for doc_id 'b' does not fit OUTPUT_SCHEMA"):
        with ResultWriter(path, flush_rows=10) as w:
            w.write(ok_result("a"))
            w.write(ok_result("b", num_tokens="many"))
    assert os.listdir(tmp_path) == []


def test_doc_result_checks_status():
    with pytest.raises(ValueError, match="status must be one of .* got 'done'"):
        DocResult("a", "s", status="done")
    with pytest.raises(ValueError, match="status 'error' needs an error message"):
        DocResult("a", "s", status="error")
    with pytest.raises(ValueError, match="status 'ok' with error 'x'"):
        DocResult("a", "s", error="x")


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(ValueError, match="output format must be one of .* got 'csv'"):
        ResultWriter(tmp_path / "x.csv", "csv")
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        read_results(tmp_path / "x.csv")


ROWS = st.builds(
    lambda i, summary, n, wall, experts: ok_result(
        f"doc-{i}", num_chunks=n, summary=summary, wall_s=wall, expert_tokens=experts
    ),
    st.integers(0, 10**6),
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40),
    st.integers(0, 3),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.none() | st.lists(st.integers(0, 2**40), max_size=8),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(results=st.lists(ROWS, max_size=6, unique_by=lambda r: r.doc_id),
       fmt=st.sampled_from(["parquet", "jsonl"]))
def test_round_trip_property(tmp_path_factory, results, fmt):
    path = tmp_path_factory.mktemp("out") / f"r.{fmt}"
    with ResultWriter(path, fmt, flush_rows=4) as w:
        for r in results:
            w.write(r)
    assert read_results(path) == [r.to_row() for r in results]
