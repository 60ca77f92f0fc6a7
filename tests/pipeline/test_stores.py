import builtins
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.stores import Document, StoreError, content_hash, open_store, safe_file_stem

ROOT = Path(__file__).resolve().parents[2]
CONTENT = {
    "alpha": "The first document.\n\nIt has two paragraphs.",
    "beta": "Zweites Dokument: Grüße, 中文, 😀.",
    "gamma": "third " * 50,
}


def write_text_dir(root: Path, docs: dict[str, str]) -> Path:
    for doc_id, text in docs.items():
        path = root / doc_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    table = pa.Table.from_pylist(rows) if rows else pa.table(
        {"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def summary(docs: list[Document]) -> list[tuple]:
    return [(d.doc_id, d.text, d.content_hash, d.error) for d in docs]


def test_three_formats_yield_the_same_documents(tmp_path):
    ids = [f"{k}.txt" for k in CONTENT]
    rows = [{"id": f"{k}.txt", "text": v} for k, v in CONTENT.items()]
    from_dir = list(open_store(write_text_dir(tmp_path / "dir", dict(zip(ids, CONTENT.values(),
                                                                          strict=True)))))
    from_jsonl = list(open_store(write_jsonl(tmp_path / "s.jsonl", rows)))
    from_parquet = list(open_store(write_parquet(tmp_path / "s.parquet", rows)))
    assert summary(from_dir) == summary(from_jsonl) == summary(from_parquet)
    assert [d.content_hash for d in from_dir] == [content_hash(t) for t in CONTENT.values()]
    assert all(d.is_ok for d in from_dir)
    assert from_dir[0].source == str(tmp_path / "dir" / "alpha.txt")
    assert from_jsonl[1].source == f"{tmp_path / 's.jsonl'}#2"
    assert from_parquet[2].source == f"{tmp_path / 's.parquet'}#2"


def test_example_store_reads():
    docs = list(open_store(ROOT / "examples/sotu"))
    assert [d.doc_id for d in docs] == [
        "1790_george_washington_n.txt",
        "1934_franklin_d_roosevelt_d.txt",
        "2002_george_w_bush_r.txt",
    ]
    assert all(d.is_ok and len(d.text) > 8000 for d in docs)


def test_text_dir_is_recursive_sorted_and_filtered(tmp_path):
    write_text_dir(tmp_path, {"b/z.md": "zed", "a.txt": "a", "b/a.txt": "ba", "notes.pdf": "x",
                              "c.TXT": "upper"})
    docs = list(open_store(tmp_path))
    assert [d.doc_id for d in docs] == ["a.txt", "b/a.txt", "b/z.md", "c.TXT"]
    assert [d.doc_id for d in open_store(tmp_path, glob="b/*.md")] == ["b/z.md"]
    assert [d.doc_id for d in open_store(tmp_path / "b/z.md")] == ["z.md"]


def test_bad_text_files_fail_alone(tmp_path):
    write_text_dir(tmp_path, {"1-ok.txt": "fine"})
    (tmp_path / "2-empty.txt").write_bytes(b"")
    (tmp_path / "3-blank.txt").write_bytes(b" \n\t\n")
    (tmp_path / "4-binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00rest")
    (tmp_path / "5-latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "6-bom.txt").write_bytes("\ufeffwith bom".encode())
    write_text_dir(tmp_path, {"7-ok.md": "also fine"})
    docs = {d.doc_id: d for d in open_store(tmp_path)}
    assert list(docs) == ["1-ok.txt", "2-empty.txt", "3-blank.txt", "4-binary.txt",
                          "5-latin1.txt", "6-bom.txt", "7-ok.md"]
    assert docs["1-ok.txt"].text == "fine" and docs["7-ok.md"].text == "also fine"
    assert docs["6-bom.txt"].text == "with bom"
    bad = {k: d.error for k, d in docs.items() if not d.is_ok}
    src = str(tmp_path)
    assert bad == {
        "2-empty.txt": f"{src}/2-empty.txt: empty document (no text)",
        "3-blank.txt": f"{src}/3-blank.txt: empty document (no text)",
        "4-binary.txt": f"{src}/4-binary.txt: binary content (NUL byte at offset 8), "
                        "not a text document",
        "5-latin1.txt": f"{src}/5-latin1.txt: invalid UTF-8 at byte 3 (unexpected end of data); "
                        "re-encode the file as UTF-8",
    }
    for k in bad:
        assert docs[k].text is None
    assert docs["4-binary.txt"].content_hash == content_hash((tmp_path / "4-binary.txt").read_bytes())


def test_unreadable_file_fails_alone_via_monkeypatched_open(tmp_path, monkeypatch):
    write_text_dir(tmp_path, {"a.txt": "a", "b.txt": "b", "c.txt": "c"})
    denied = str(tmp_path / "b.txt")
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if str(file) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    docs = list(open_store(tmp_path))
    assert [d.is_ok for d in docs] == [True, False, True]
    assert docs[1].error == f"{denied}: cannot read file (Permission denied)"
    assert docs[1].content_hash == content_hash(b"")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_fails_alone_chmod(tmp_path):
    write_text_dir(tmp_path, {"a.txt": "a", "b.txt": "b"})
    (tmp_path / "a.txt").chmod(0)
    try:
        docs = list(open_store(tmp_path))
    finally:
        (tmp_path / "a.txt").chmod(0o644)
    assert [d.is_ok for d in docs] == [False, True]
    assert "cannot read file" in docs[0].error


def test_bad_jsonl_lines_fail_alone(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"id": "ok1", "text": "one", "lang": "en"}),
        "",  # blank lines are skipped
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "nt", "body": "x"}),
        json.dumps({"id": "null", "text": None}),
        json.dumps({"id": "num", "text": 42}),
        json.dumps({"id": "empty", "text": ""}),
        json.dumps({"id": 7, "text": "integer id"}),
        json.dumps({"id": [1], "text": "bad id"}),
        json.dumps({"text": "no id"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "bin", "text": "caf\xe9"}\n')
    docs = list(open_store(path))
    got = [(d.doc_id, d.text, d.error) for d in docs]
    p = str(path)
    assert got == [
        ("ok1", "one", None),
        ("docs:3", None, f"{p}#3: not valid JSON (Expecting property name enclosed in double "
                         "quotes at column 2)"),
        ("docs:4", None, f"{p}#4: expected a JSON object, got list"),
        ("nt", None, f"{p}#5: no 'text' field (fields: body, id); pass --text-column"),
        ("null", None, f"{p}#6: 'text' is null"),
        ("num", None, f"{p}#7: 'text' is int, not a string"),
        ("empty", None, f"{p}#8: empty document (no text)"),
        ("7", "integer id", None),
        ("docs:10", None, f"{p}#10: 'id' must be a non-empty string or an integer, got [1]"),
        ("docs:11", "no id", None),
        ("docs:12", None, f"{p}#12: invalid UTF-8 at byte 26 of the line (invalid continuation "
                          "byte); re-encode the file as UTF-8"),
    ]
    assert docs[0].metadata == {"format": "jsonl", "line": 1, "lang": "en"}
    assert [d.doc_id for d in open_store(path, text_column="body")][3] == "nt"


def test_duplicate_ids_fail_after_the_first(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "first"},
                                              {"id": "y", "text": "other"},
                                              {"id": "x", "text": "second"}])
    docs = list(open_store(path))
    assert [d.is_ok for d in docs] == [True, True, False]
    assert docs[2].doc_id == f"x#dup@{path}#3"  # its own row, under an id of its own
    assert docs[2].error == (f"{path}#3: duplicate doc_id 'x', first seen at {path}#1; "
                             "make the ids unique")
    pq_path = write_parquet(tmp_path / "d.parquet", [{"id": "x", "text": "a"},
                                                     {"id": "x", "text": "b"}])
    assert [d.is_ok for d in open_store(pq_path)] == [True, False]


def test_parquet_without_text_column_is_a_store_error(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"id": "a", "body": "x"}])
    with pytest.raises(StoreError) as info:
        open_store(path)  # raised before iteration starts
    assert str(info.value) == (f"{path} has no column 'text' (columns: id, body); pass "
                               "--text-column with the column that holds the text")
    assert [d.text for d in open_store(path, text_column="body")] == ["x"]


def test_parquet_non_string_text_column_is_a_store_error(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"id": "a", "text": 3}])
    with pytest.raises(StoreError, match="column 'text' has type int64, not string"):
        open_store(path)


def test_parquet_null_and_bad_rows_fail_alone(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"id": "a", "text": "ok"},
                                                  {"id": None, "text": None},
                                                  {"id": "c", "text": ""},
                                                  {"id": "d", "text": "fine"}])
    docs = list(open_store(path))
    assert [(d.doc_id, d.error) for d in docs] == [
        ("a", None),
        ("p:1", f"{path}#1: 'text' is null"),
        ("c", f"{path}#2: empty document (no text)"),
        ("d", None),
    ]


def test_parquet_binary_text_column_is_decoded(tmp_path):
    table = pa.table({"text": pa.array([b"bytes ok", b"\xff\xfe bad", b"nul\x00"], pa.binary())})
    pq.write_table(table, tmp_path / "b.parquet")
    docs = list(open_store(tmp_path / "b.parquet"))
    assert [d.text for d in docs] == ["bytes ok", None, None]
    assert [d.doc_id for d in docs] == ["b:0", "b:1", "b:2"]
    assert "invalid UTF-8 at byte 0" in docs[1].error and "NUL byte" in docs[2].error


def test_empty_parquet_yields_nothing(tmp_path):
    assert list(open_store(write_parquet(tmp_path / "e.parquet", []))) == []


def test_parquet_is_read_batch_by_batch(tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "text": f"row {i}"} for i in range(50)]
    path = write_parquet(tmp_path / "big.parquet", rows, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 5
    sizes = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    it = open_store(path, batch_size=4)
    first = [next(it) for _ in range(3)]
    assert sizes == [4]  # lazily: only the first batch has been read
    docs = first + list(it)
    assert [d.doc_id for d in docs] == [r["id"] for r in rows]
    assert max(sizes) == 4 and sum(sizes) == 50


def test_directory_of_parquet_files(tmp_path):
    write_parquet(tmp_path / "part-1.parquet", [{"text": "b0"}, {"text": "b1"}])
    write_parquet(tmp_path / "part-0.parquet", [{"text": "a0"}])
    docs = list(open_store(tmp_path))
    assert [(d.doc_id, d.text) for d in docs] == [("part-0:0", "a0"), ("part-1:0", "b0"),
                                                  ("part-1:1", "b1")]


def test_limit_stops_early(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": f"t{i}"} for i in range(10)])
    assert [d.text for d in open_store(path, limit=3)] == ["t0", "t1", "t2"]
    assert list(open_store(path, limit=0)) == []


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda p: p / "missing", {}, "input '{p}/missing' does not exist; pass a directory of "
         ".txt/.md files, a .jsonl file or a .parquet file/directory"),
        (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", {},
         "input '{p}/x.csv' has an unknown format '.csv'; pass a directory of .txt/.md files, "
         "a .jsonl file or a .parquet file/directory"),
        (lambda p: p, {}, "input '{p}' has no .txt, .md or .parquet files matching glob '**/*'; "
         "check the path or pass --glob"),
        (lambda p: (p / "x.parquet").write_text("not parquet") and p / "x.parquet", {},
         "{p}/x.parquet is not a readable Parquet file"),
        (lambda p: p, {"limit": -1}, "limit must be a non-negative integer, got -1"),
    ],
)
def test_store_errors_name_input_and_fix(tmp_path, make, kwargs, message):
    with pytest.raises(StoreError) as info:
        open_store(make(tmp_path), **kwargs)
    assert str(info.value).startswith(message.format(p=tmp_path))
    assert "\n" not in str(info.value)


def test_mixed_directory_asks_for_glob(tmp_path):
    write_text_dir(tmp_path, {"a.txt": "a"})
    write_parquet(tmp_path / "b.parquet", [{"text": "b"}])
    with pytest.raises(StoreError, match="mixes text and Parquet files"):
        open_store(tmp_path)
    assert [d.text for d in open_store(tmp_path, glob="*.parquet")] == ["b"]


@pytest.mark.parametrize("doc_id", ["../../etc/passwd", "/abs/path", "..", ".", "", "a\0b",
                                    "con", "x" * 500, "ok-name.txt", "中文/😀", "a\\..\\b"])
def test_safe_file_stem_cannot_escape(doc_id, tmp_path):
    stem = safe_file_stem(doc_id)
    assert stem and "/" not in stem and "\\" not in stem and "\0" not in stem
    assert not stem.startswith((".", "-")) and ".." not in stem and len(stem) <= 100
    assert (tmp_path / stem).resolve().parent == tmp_path.resolve()


@settings(max_examples=50)
@given(st.lists(st.text(max_size=30), unique=True, max_size=30))
def test_safe_file_stem_is_unique_and_safe(doc_ids):
    stems = [safe_file_stem(i) for i in doc_ids]
    assert len(set(stems)) == len(stems)
    for s in stems:
        assert s.replace("_", "a").replace("-", "a").replace(".", "a").isascii()
        assert "/" not in s and ".." not in s and not s.startswith(".")


TEXTS = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
                min_size=1, max_size=60).filter(lambda t: t.strip() and not t.startswith("\ufeff"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, max_size=8), ids=st.data())
def test_write_then_read_returns_the_same_rows(tmp_path_factory, texts, ids):
    root = tmp_path_factory.mktemp("rt")
    doc_ids = ids.draw(st.lists(st.text(alphabet="abcxyz019_-", min_size=1, max_size=8),
                                min_size=len(texts), max_size=len(texts), unique=True))
    rows = [{"id": i, "text": t} for i, t in zip(doc_ids, texts, strict=True)]
    want = [(r["id"], r["text"], content_hash(r["text"])) for r in rows]
    for path in (write_jsonl(root / "s.jsonl", rows), write_parquet(root / "s.parquet", rows,
                                                                     row_group_size=3)):
        got = [(d.doc_id, d.text, d.content_hash) for d in open_store(path, batch_size=2)]
        assert got == want, path
    text_dir = write_text_dir(root / "dir", {f"{i}.txt": t for i, t in zip(doc_ids, texts,
                                                                           strict=True)})
    if texts:
        got = sorted((d.doc_id, d.text) for d in open_store(text_dir))
        assert got == sorted((f"{i}.txt", t) for i, t in zip(doc_ids, texts, strict=True))
