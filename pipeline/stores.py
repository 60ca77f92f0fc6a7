"""Document stores: read a directory of text files, a JSONL file or Parquet into Documents.

Stores are streamed: one file, one line or one record batch at a time, never the whole store
in memory. `open_store` checks the store itself before returning (it exists, its format is
known, Parquet has the text column) and raises StoreError with a one-line fix; after that a
document that cannot be read is still yielded, as a failed Document (`text=None`, `error`
naming the source and the cause), so that it becomes an error row instead of stopping the run.

Formats and ids:
- directory of `.txt` / `.md` files (recursive, `glob` filter, sorted by relative path):
  doc_id = the relative path as is (`a/b.txt`), source = the file path; a single `.txt` /
  `.md` file is a store of one document (doc_id = its name);
- `.jsonl` file: one JSON object per line (blank lines skipped); doc_id = `id_column` when the
  object has it, else `"{stem}:{line_no}"` (1-based); source = `path#line_no`;
- `.parquet` file, or a directory of them: read in record batches; doc_id = `id_column` when
  the file has it (null -> fallback), else `"{stem}:{row}"` (0-based row in the file);
  source = `path#row`.
Ids are data, not paths: use `safe_file_stem` to name a file after one.

Any of these can be a URI (`s3://bucket/prefix`, `gs://...`, `hdfs://...`, `file://...`;
pipeline.fs): a prefix is a directory, objects are streamed the same way (JSONL a buffer
at a time, Parquet by record batches from a seekable remote file), and `source` names the URI.
In a `--glob` over a prefix, `*` also matches `/`, and `**/` may match nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fs import Location, LocationError, open_local_or_remote

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".txt", ".md"})
JSONL_SUFFIXES = frozenset({".jsonl"})
PARQUET_SUFFIXES = frozenset({".parquet"})
DEFAULT_BATCH_SIZE = 256
_UTF8_BOM = "\ufeff"


class StoreError(ValueError):
    """The store as a whole cannot be read as configured (a one-line message with the fix)."""


@dataclass(slots=True)
class Document:
    """One input document. A failed Document has `text=None` and `error` set; its
    content_hash is of the raw bytes that could be read (empty when none)."""

    doc_id: str
    source: str
    text: str | None
    content_hash: str
    metadata: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None


def content_hash(data: str | bytes) -> str:
    """sha256 hex of the UTF-8 text (or of raw bytes)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def safe_file_stem(doc_id: str, max_len: int = 80) -> str:
    """A file name stem for `doc_id` that cannot escape a directory.

    Only [A-Za-z0-9._-] survive (no '/', '\\', NUL or '..' path parts), it never starts with
    '.' or '-', and a hash suffix keeps distinct ids distinct after the rewrite.
    """
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id)
    base = re.sub(r"\.{2,}", "_", base).strip("._-")[:max_len].rstrip("._-")
    return f"{base}-{digest}" if base else f"doc-{digest}"


def _ok(doc_id: str, source: str, text: str, metadata: dict) -> Document:
    return Document(doc_id, source, text, content_hash(text), metadata)


def _failed(doc_id: str, source: str, raw: bytes, error: str, metadata: dict) -> Document:
    logger.debug("failed document %s: %s", doc_id, error)
    return Document(doc_id, source, None, content_hash(raw), metadata, error)


def _decode(raw: bytes, source: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, error) for the bytes of one document."""
    nul = raw.find(b"\0")
    if nul >= 0:
        return None, f"{source}: binary content (NUL byte at offset {nul}), not a text document"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (
            f"{source}: invalid UTF-8 at byte {exc.start} ({exc.reason}); "
            f"re-encode the file as UTF-8"
        )
    return _check_text(text.removeprefix(_UTF8_BOM), source)


def _check_text(text: object, source: str, column: str = "text") -> tuple[str | None, str | None]:
    if text is None:
        return None, f"{source}: {column} is null"
    if not isinstance(text, str):
        return None, f"{source}: {column} is {type(text).__name__}, not a string"
    if "\0" in text:
        return None, f"{source}: binary content (NUL character in {column})"
    if not text.strip():
        return None, f"{source}: empty document (no text)"
    return text, None


def _id_value(value: object) -> str | None:
    """A doc_id from a store value: strings and integers; None when unusable."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


# -- directory of text files ---------------------------------------------------------------


def _open_binary(path: Path | Location):
    return path.open_read() if isinstance(path, Location) else open(path, "rb")


def _parquet_source(path: Path | Location):
    return path.open_random() if isinstance(path, Location) else path


def _remote_glob(root: Location, pattern: str) -> list[Location]:
    def matches(rel: str) -> bool:
        return fnmatchcase(rel, pattern) or (pattern.startswith("**/")
                                             and fnmatchcase(rel, pattern[3:]))

    return [p for p in root.files() if matches(p.relative_to(root).as_posix())]


def _files_by_suffix(root: Path | Location, glob: str,
                     suffixes: frozenset[str]) -> list[Path | Location]:
    """Files under `root` matching `glob` with one of `suffixes`, sorted by relative path."""
    if isinstance(root, Location):
        return [p for p in _remote_glob(root, glob) if p.suffix.lower() in suffixes]
    return sorted(
        (p for p in _glob(root, glob) if p.suffix.lower() in suffixes and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _read_text_dir(root: Path, files: list[Path]) -> Iterator[Document]:
    for path in files:
        doc_id = path.relative_to(root).as_posix()
        source = str(path)
        try:
            with _open_binary(path) as f:
                raw = f.read()
        except OSError as exc:
            yield _failed(doc_id, source, b"", f"{source}: cannot read file ({exc.strerror or exc})",
                          {"format": "text"})
            continue
        text, error = _decode(raw, source)
        meta = {"format": "text", "num_bytes": len(raw)}
        yield _ok(doc_id, source, text, meta) if error is None else _failed(
            doc_id, source, raw, error, meta
        )


# -- JSONL --------------------------------------------------------------------------------


def _read_jsonl(path: Path, id_column: str, text_column: str) -> Iterator[Document]:
    stem = path.stem
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            source = f"{path}#{line_no}"
            fallback_id = f"{stem}:{line_no}"
            meta = {"format": "jsonl", "line": line_no}
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield _failed(fallback_id, source, raw,
                              f"{source}: invalid UTF-8 at byte {exc.start} of the line "
                              f"({exc.reason}); re-encode the file as UTF-8", meta)
                continue
            try:
                obj = json.loads(line.removeprefix(_UTF8_BOM) if line_no == 1 else line)
            except json.JSONDecodeError as exc:
                yield _failed(fallback_id, source, raw,
                              f"{source}: not valid JSON ({exc.msg} at column {exc.colno})", meta)
                continue
            if not isinstance(obj, dict):
                yield _failed(fallback_id, source, raw,
                              f"{source}: expected a JSON object, got {type(obj).__name__}", meta)
                continue
            doc_id = fallback_id
            if obj.get(id_column) is not None:
                doc_id = _id_value(obj[id_column])
                if doc_id is None:
                    yield _failed(fallback_id, source, raw,
                                  f"{source}: {id_column!r} must be a non-empty string or an "
                                  f"integer, got {obj[id_column]!r}", meta)
                    continue
            if text_column not in obj:
                fields = ", ".join(sorted(obj)) or "none"
                yield _failed(doc_id, source, raw,
                              f"{source}: no {text_column!r} field (fields: {fields}); "
                              f"pass --text-column", meta)
                continue
            meta.update((k, v) for k, v in obj.items() if k not in (id_column, text_column))
            text, error = _check_text(obj[text_column], source, repr(text_column))
            yield _ok(doc_id, source, text, meta) if error is None else _failed(
                doc_id, source, raw, error, meta
            )


# -- Parquet ------------------------------------------------------------------------------

_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
               pa.types.is_large_binary)


def _string_view(t: pa.DataType) -> bool:
    return getattr(pa.types, "is_string_view", lambda _: False)(t)


def _parquet_problem(path: Path, text_column: str) -> str | None:
    """Why a Parquet file cannot be read as configured, or None."""
    try:
        schema = pq.read_schema(_parquet_source(path))
    except (OSError, pa.ArrowException) as exc:
        return f"{path} is not a readable Parquet file ({exc}); check the input"
    if text_column not in schema.names:
        columns = ", ".join(schema.names) or "none"
        return (f"{path} has no column {text_column!r} (columns: {columns}); "
                f"pass --text-column with the column that holds the text")
    text_type = schema.field(text_column).type
    if not (any(check(text_type) for check in _TEXT_TYPES) or _string_view(text_type)):
        return (f"{path}: column {text_column!r} has type {text_type}, not string; "
                f"pass --text-column with the column that holds the text")
    return None


def _check_parquet(files: list[Path], text_column: str) -> dict[Path, str]:
    """Problems per file. When no file can be read as configured the store itself is wrong
    (StoreError); otherwise each bad file of a dataset becomes one failed document."""
    problems = {p: msg for p in files if (msg := _parquet_problem(p, text_column))}
    if len(problems) == len(files):
        raise StoreError(next(iter(problems.values())))
    return problems


def _read_parquet(files: list[Path], id_column: str, text_column: str,
                  batch_size: int, problems: dict[Path, str],
                  meta_columns: tuple[str, ...] = ()) -> Iterator[Document]:
    for path in files:
        if path in problems:
            yield _failed(f"{path.name}:*", str(path), b"", problems[path], {"format": "parquet"})
            continue
        pf = pq.ParquetFile(_parquet_source(path))
        has_id = id_column in pf.schema_arrow.names
        columns = [text_column] + ([id_column] if has_id and id_column != text_column else [])
        extra = [c for c in meta_columns if c in pf.schema_arrow.names and c not in columns]
        columns += extra
        stem = path.stem
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            texts = batch.column(text_column).to_pylist()
            ids = batch.column(id_column).to_pylist() if has_id else [None] * len(texts)
            metas = [batch.column(c).to_pylist() for c in extra]
            for j, (value, id_value) in enumerate(zip(texts, ids, strict=True)):
                source = f"{path}#{row}"
                doc_id = _id_value(id_value) or f"{stem}:{row}"
                meta = {"format": "parquet", "row": row}
                meta.update((c, values[j]) for c, values in zip(extra, metas))
                raw = b""
                if isinstance(value, bytes):
                    raw = value
                    text, error = _decode(value, source)
                else:
                    text, error = _check_text(value, source, repr(text_column))
                    if isinstance(value, str):
                        raw = value.encode("utf-8", "surrogatepass")
                if id_value is not None and _id_value(id_value) is None:
                    error = (f"{source}: {id_column!r} must be a non-empty string or an "
                             f"integer, got {id_value!r}")
                yield _ok(doc_id, source, text, meta) if error is None else _failed(
                    doc_id, source, raw, error, meta
                )
                row += 1


# -- dispatch -----------------------------------------------------------------------------


def _glob(root: Path, pattern: str) -> Iterator[Path]:
    try:
        yield from root.glob(pattern)
    except (ValueError, NotImplementedError) as exc:
        raise StoreError(f"bad --glob {pattern!r} for {root} ({exc}); use a relative pattern "
                         f"such as '**/*.txt'") from exc


def _dedup(docs: Iterator[Document], limit: int | None) -> Iterator[Document]:
    # Only the ids and their first source are kept (a few hundred bytes per document).
    first_source: dict[str, str] = {}
    num_docs = 0
    if limit == 0:
        return
    for doc in docs:
        seen_at = first_source.get(doc.doc_id)
        if seen_at is not None:
            # The copy still gets its own row (nothing is lost), under an id of its own so
            # the output keeps one row per id: "<id>#dup@<source>".
            doc = Document(f"{doc.doc_id}#dup@{doc.source}", doc.source, None, doc.content_hash,
                           doc.metadata,
                           f"{doc.source}: duplicate doc_id {doc.doc_id!r}, first seen at "
                           f"{seen_at}; make the ids unique")
        else:
            first_source[doc.doc_id] = doc.source
        yield doc
        num_docs += 1
        if limit is not None and num_docs >= limit:
            return


def _check_columns(path: Path, kind: str, columns: tuple[str, ...], have: list[str] | None) -> None:
    """Routing rules name metadata columns: each must be in the store, before any work."""
    if not columns:
        return
    if have is None:
        raise StoreError(f"input {str(path)!r} is a directory of text files: it has no columns "
                         f"for the rule(s) on column:{columns[0]}; use a JSONL or Parquet store, "
                         f"or route by tokens or stage")
    for c in columns:
        if c not in have:
            raise StoreError(f"input {str(path)!r}: routing rule names column {c!r}, which the "
                             f"{kind} does not have (columns: {', '.join(have) or 'none'}); fix "
                             f"the rule's column:NAME")


def _jsonl_columns(path: Path) -> list[str] | None:
    """The keys of the first JSON object of a JSONL file (None when it has none)."""
    with _open_binary(path) as f:
        for raw in f:
            if raw.strip():
                try:
                    obj = json.loads(raw.decode("utf-8").removeprefix(_UTF8_BOM))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return None
                return sorted(obj) if isinstance(obj, dict) else None
    return None


def open_store(
    path: str | Path,
    *,
    glob: str = "**/*",
    id_column: str = "id",
    text_column: str = "text",
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    columns: list[str] | tuple[str, ...] = (),
) -> Iterator[Document]:
    """Stream the Documents of the store at `path` (see the module docstring for formats).

    Raises StoreError now, before any document is read, when the input does not exist, its
    format is unknown, a directory holds no known files, or a Parquet file lacks
    `text_column`. Duplicate doc_ids after the first become failed Documents. `limit` stops after that many
    documents (failed ones included); `batch_size` is the Parquet record-batch size.
    `columns`: metadata columns routing rules read; each must exist (StoreError), and lands
    in `Document.metadata` (JSONL rows carry all their other fields there anyway).
    """
    columns = tuple(columns)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise StoreError(f"limit must be a non-negative integer, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StoreError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        path = open_local_or_remote(path)
        exists = path.exists()
    except LocationError as exc:
        raise StoreError(f"input {exc}") from None
    if not exists:
        raise StoreError(
            f"input {str(path)!r} does not exist; pass a directory of .txt/.md files, "
            f"a .jsonl file or a .parquet file/directory"
        )
    docs: Iterator[Document]
    if path.is_dir():
        files = _files_by_suffix(path, glob, TEXT_SUFFIXES | PARQUET_SUFFIXES)
        text_files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
        parquet_files = [p for p in files if p.suffix.lower() in PARQUET_SUFFIXES]
        if text_files and parquet_files:
            raise StoreError(
                f"input {str(path)!r} mixes text and Parquet files under glob {glob!r}; "
                f"pass --glob '**/*.parquet' or '**/*.txt' to pick one"
            )
        if parquet_files:
            problems = _check_parquet(parquet_files, text_column)
            good = next(p for p in parquet_files if p not in problems)
            _check_columns(path, "Parquet dataset", columns,
                           pq.read_schema(_parquet_source(good)).names)
            docs = _read_parquet(parquet_files, id_column, text_column, batch_size, problems,
                                 columns)
        elif text_files:
            _check_columns(path, "", columns, None)
            docs = _read_text_dir(path, text_files)
        else:
            raise StoreError(
                f"input {str(path)!r} has no .txt, .md or .parquet files matching glob "
                f"{glob!r}; check the path or pass --glob"
            )
    elif path.suffix.lower() in TEXT_SUFFIXES:
        _check_columns(path, "", columns, None)
        docs = _read_text_dir(path.parent, [path])  # a Location's parent is its prefix
    elif path.suffix.lower() in JSONL_SUFFIXES:
        try:
            with _open_binary(path):
                pass
        except OSError as exc:
            raise StoreError(f"cannot read {str(path)!r} ({exc.strerror or exc}); "
                             f"check its permissions") from exc
        if columns:
            _check_columns(path, "first JSON object", columns, _jsonl_columns(path) or [])
        docs = _read_jsonl(path, id_column, text_column)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        problems = _check_parquet([path], text_column)
        _check_columns(path, "Parquet file", columns, pq.read_schema(_parquet_source(path)).names)
        docs = _read_parquet([path], id_column, text_column, batch_size, problems, columns)
    else:
        raise StoreError(
            f"input {str(path)!r} has an unknown format {path.suffix or '(no suffix)'!r}; "
            f"pass a directory of .txt/.md files, a .jsonl file or a .parquet file/directory"
        )
    return _dedup(docs, limit)


def estimate_num_documents(path: str | Path, *, glob: str = "**/*",
                           limit: int | None = None) -> int | None:
    """The number of documents `open_store` will yield, when it is cheap to know (the files
    of a text directory, the row counts in Parquet footers); None otherwise (JSONL would need
    a full read) or when the store cannot be listed. For progress bars only."""
    try:
        where = open_local_or_remote(path)
        if where.is_dir():
            files = _files_by_suffix(where, glob, TEXT_SUFFIXES | PARQUET_SUFFIXES)
            parquet = [p for p in files if p.suffix.lower() in PARQUET_SUFFIXES]
            count = (sum(pq.ParquetFile(_parquet_source(p)).metadata.num_rows for p in parquet)
                     if parquet else len(files))
        elif where.suffix.lower() in TEXT_SUFFIXES:
            count = 1
        elif where.suffix.lower() in PARQUET_SUFFIXES:
            count = pq.ParquetFile(_parquet_source(where)).metadata.num_rows
        else:
            return limit
    except (OSError, ValueError, StoreError, pa.ArrowException):
        return limit
    return count if limit is None else min(count, limit)
