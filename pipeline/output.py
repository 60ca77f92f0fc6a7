"""Result rows -> Parquet or JSONL, written to a temp file and renamed into place.

One row per input document (OUTPUT_SCHEMA):

| column | type | meaning |
| --- | --- | --- |
| doc_id | string | the store's document id |
| source | string | file path, `path#line` (JSONL) or `path#row` (Parquet) |
| status | string | `ok` or `error` |
| error | string, null when ok | what went wrong, naming the input and the cause |
| summary | string, null on error | the document's final output |
| chunks | list<struct<index int32, token_start int64, token_end int64, char_start int64, char_end int64, output string, pool string, model string, expert_tokens list<int64>, expert_tokens_per_layer list<list<int64>>>> | per-chunk outputs; offsets index the document's tiktoken tokens and text; `pool` and `model` made the output; `expert_tokens`: an MoE's tokens per expert for that output's request, summed over layers; `expert_tokens_per_layer`: the same per MoE layer (null unless `expert_tokens_per_layer` is set) |
| num_tokens | int64 | tiktoken tokens in the document |
| num_chunks | int32 | number of chunks |
| model | string | model id |
| dtype | string | compute dtype the model ran in ("auto" resolved: float32, bfloat16, ...) |
| kv_cache_dtype | string | KV cache dtype |
| strategy | string | summarization strategy |
| config_fingerprint | string | hash of everything that changes the output |
| content_hash | string | sha256 of the document text (of the raw bytes for unreadable ones) |
| prompt_tokens | int64 | prompt tokens over all requests (model tokenizer) |
| generated_tokens | int64 | generated tokens over all requests |
| cached_tokens | int64 | prompt tokens served from the prefix cache |
| wall_s | float64 | seconds from first request to last output |
| expert_tokens | list<int64>, null for dense models | tokens routed to each expert (MoE) |
| num_truncated_prompts, num_truncated_tokens | int32, int64 | prompts cut to fit the context, and the tokens cut |
| merges | list<struct<level int32, index int32, sources list<int32>, pool string, model string>> | each merge: its level (1 first), group, the chunks it covers, and the pool and model that made it |
| active_flops, dense_flops | int64 | model FLOPs of the row's requests with the active parameters, and as if every expert were active (equal for dense models; `pipeline.accounting`) |

`model`, `dtype` and `kv_cache_dtype` are those of the pool that produced the summary.

JSONL rows carry the same keys in the same order. Rows are buffered and flushed as record
batches every `flush_rows` rows to `<path>.tmp-<pid>`; `close()` renames that to `path`
(os.replace, atomic on one file system). On an exception inside `with ResultWriter(...)` the
temp file is removed and `path` is left as it was (absent if it did not exist).

`path` may be a URI (`s3://bucket/out.parquet`; pipeline.fs): rows stream to the hidden
object `.<name>.tmp-<pid>-<random>` beside it (a multipart upload, invisible until complete),
and `close()` moves it to `path` (a server-side copy, so `path` appears whole or not at all,
then the temporary object is deleted). No `fsync`/rename exists there; a killed writer leaves
at most an uncompleted upload or a hidden temporary object.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fs import Location, LocationError, open_local_or_remote, unique_token
from pipeline.stores import Document

logger = logging.getLogger(__name__)

CHUNK_STRUCT = pa.struct(
    [
        pa.field("index", pa.int32(), nullable=False),
        pa.field("token_start", pa.int64(), nullable=False),
        pa.field("token_end", pa.int64(), nullable=False),
        pa.field("char_start", pa.int64(), nullable=False),
        pa.field("char_end", pa.int64(), nullable=False),
        pa.field("output", pa.string()),
        pa.field("pool", pa.string()),  # the pool and model that produced `output`
        pa.field("model", pa.string()),
        pa.field("expert_tokens", pa.list_(pa.int64())),  # MoE: the chunk's tokens per expert
        # MoE with expert_tokens_per_layer: the same per MoE layer, [layer][expert]
        pa.field("expert_tokens_per_layer", pa.list_(pa.list_(pa.int64()))),
    ]
)
MERGE_STRUCT = pa.struct(
    [
        pa.field("level", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("sources", pa.list_(pa.int32()), nullable=False),  # chunk indices it covers
        pa.field("pool", pa.string()),
        pa.field("model", pa.string()),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("summary", pa.string()),
        pa.field("chunks", pa.list_(pa.field("item", CHUNK_STRUCT, nullable=False)),
                 nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),
        pa.field("num_chunks", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("dtype", pa.string()),
        pa.field("kv_cache_dtype", pa.string()),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("config_fingerprint", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("generated_tokens", pa.int64(), nullable=False),
        pa.field("cached_tokens", pa.int64(), nullable=False),
        pa.field("wall_s", pa.float64(), nullable=False),
        pa.field("expert_tokens", pa.list_(pa.int64())),
        # prompts of this document cut to fit the model's context, and the tokens cut in all
        # (nullable: parts written before these columns read them as null)
        pa.field("num_truncated_prompts", pa.int32()),
        pa.field("num_truncated_tokens", pa.int64()),
        pa.field("merges", pa.list_(pa.field("item", MERGE_STRUCT, nullable=False))),
        # model FLOPs of the row's requests: with the active parameters, and as if every
        # expert were active (equal for dense models); pipeline.accounting
        pa.field("active_flops", pa.int64()),
        pa.field("dense_flops", pa.int64()),
    ]
)

FORMATS = ("parquet", "jsonl")
STATUSES = ("ok", "error")
DEFAULT_FLUSH_ROWS = 256


@dataclass(slots=True, frozen=True)
class ChunkRow:
    """One element of a row's `chunks` column."""

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    output: str | None
    pool: str | None = None
    model: str | None = None
    expert_tokens: list[int] | None = None
    expert_tokens_per_layer: list[list[int]] | None = None  # [MoE layer][expert], when asked


@dataclass(slots=True)
class DocResult:
    """One output row. status "ok" has no error; status "error" has an error message."""

    doc_id: str
    source: str
    status: str = "ok"
    error: str | None = None
    summary: str | None = None
    chunks: list[ChunkRow | dict] = field(default_factory=list)  # dicts with the same keys
    num_tokens: int = 0
    num_chunks: int = 0
    model: str = ""
    dtype: str | None = None  # resolved compute dtype ("float32", "bfloat16", ...)
    kv_cache_dtype: str | None = None
    strategy: str = ""
    config_fingerprint: str = ""
    content_hash: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    wall_s: float = 0.0
    expert_tokens: list[int] | None = None
    num_truncated_prompts: int = 0  # prompts cut to fit the context (chunk or merge prompts)
    num_truncated_tokens: int = 0  # message tokens those cuts removed
    merges: list[dict] = field(default_factory=list)  # MERGE_STRUCT keys
    active_flops: int | None = None
    dense_flops: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"DocResult {self.doc_id!r}: status must be one of {STATUSES}, "
                             f"got {self.status!r}")
        if self.status == "error" and not self.error:
            raise ValueError(f"DocResult {self.doc_id!r}: status 'error' needs an error message")
        if self.status == "ok" and self.error is not None:
            raise ValueError(f"DocResult {self.doc_id!r}: status 'ok' with error "
                             f"{self.error!r}; use status='error'")

    def to_row(self) -> dict[str, Any]:
        """The row as a dict with OUTPUT_SCHEMA's keys, in order."""
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["chunks"] = [_chunk_dict(c, self.doc_id) for c in self.chunks]
        row["wall_s"] = float(self.wall_s)
        if self.expert_tokens is not None:
            row["expert_tokens"] = [int(n) for n in self.expert_tokens]
        return row


_CHUNK_KEYS = tuple(f.name for f in CHUNK_STRUCT)
_OPTIONAL_CHUNK_KEYS = ("pool", "model", "expert_tokens", "expert_tokens_per_layer")
assert tuple(f.name for f in fields(DocResult)) == tuple(OUTPUT_SCHEMA.names), (
    "DocResult fields and OUTPUT_SCHEMA columns differ: update both"
)


def _chunk_dict(chunk: ChunkRow | dict, doc_id: str) -> dict[str, Any]:
    data = asdict(chunk) if isinstance(chunk, ChunkRow) else chunk
    missing = [key for key in _CHUNK_KEYS if key not in data and key not in _OPTIONAL_CHUNK_KEYS]
    if missing:
        raise ValueError(f"DocResult {doc_id!r}: chunk {data!r} lacks {', '.join(missing)}; "
                         f"chunks need the keys {', '.join(_CHUNK_KEYS)}")
    return {key: data.get(key) for key in _CHUNK_KEYS}


def _to_batch(rows: list[dict[str, Any]], path: Path) -> pa.RecordBatch:
    try:
        return pa.RecordBatch.from_pylist(rows, schema=OUTPUT_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError):
        for row in rows:  # name the row that does not fit the schema
            try:
                pa.RecordBatch.from_pylist([row], schema=OUTPUT_SCHEMA)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: row for doc_id {row['doc_id']!r} does not fit "
                                 f"OUTPUT_SCHEMA ({exc})") from exc
        raise


def error_row(doc: Document, message: str, **ctx: Any) -> DocResult:
    """The error row for `doc`; ctx sets other DocResult fields (model, strategy, ...)."""
    return DocResult(
        doc_id=doc.doc_id,
        source=doc.source,
        status="error",
        error=message,
        content_hash=doc.content_hash,
        **ctx,
    )


_TMP_MARK = ".tmp-"


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_tmp_files(directory: Path, name: str | None = None) -> list[Path]:
    """Remove `*.tmp-<pid>` files in `directory` (only `<name>.tmp-<pid>` when `name` is
    given) whose process is gone: what a killed run left behind. A live pid's file may be
    another run's work in progress and is kept. Returns the removed paths."""
    removed = []
    if not directory.is_dir():
        return removed
    prefix = glob.escape(name) if name else "*"
    for path in directory.glob(f"{prefix}{_TMP_MARK}*"):
        stem, _, pid = path.name.rpartition(_TMP_MARK)
        if not stem or not pid.isdigit() or int(pid) == os.getpid() or _pid_is_alive(int(pid)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        logger.info("removed %s, left by a killed run (pid %s)", path, pid)
        removed.append(path)
    return removed


class ResultWriter:
    """Writes DocResults to `path` atomically.

    Rules: each doc_id is written at most once; rows go to `<path>.tmp-<pid>` and appear at
    `path` only on a clean close(); abort() (and an exception in the `with` body) removes the
    temp file and leaves `path` untouched.
    """

    def __init__(self, path: str | Path, format: str = "parquet", *,
                 flush_rows: int = DEFAULT_FLUSH_ROWS) -> None:
        if format not in FORMATS:
            raise ValueError(f"output format must be one of {FORMATS}, got {format!r}")
        if isinstance(flush_rows, bool) or not isinstance(flush_rows, int) or flush_rows < 1:
            raise ValueError(f"flush_rows must be a positive integer, got {flush_rows!r}")
        self.path: Path | Location = open_local_or_remote(path)
        self.format = format
        self.flush_rows = flush_rows
        self.num_rows = 0
        self._rows: list[dict[str, Any]] = []
        self._doc_ids: set[str] = set()
        self._closed = False
        self._stream = None  # the remote object being written
        if isinstance(self.path, Location):
            self.tmp_path = self.path.with_name(f".{self.path.name}{_TMP_MARK}{unique_token()}")
            try:
                self._stream = sink = self.tmp_path.open_write()
            except OSError as exc:
                raise LocationError(f"cannot write {self.path} ({exc}); check the bucket and "
                                    f"the credentials in the environment") from None
        else:
            self.tmp_path = self.path.with_name(f"{self.path.name}{_TMP_MARK}{os.getpid()}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp_files(self.path.parent, self.path.name)
            sink = self.tmp_path
        if format == "parquet":
            self._parquet: pq.ParquetWriter | None = pq.ParquetWriter(sink, OUTPUT_SCHEMA)
            self._jsonl = None
        elif self._stream is not None:
            self._parquet = None
            self._jsonl = io.TextIOWrapper(self._stream, encoding="utf-8")
        else:
            self._parquet = None
            self._jsonl = open(self.tmp_path, "w", encoding="utf-8")

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, result: DocResult) -> None:
        assert not self._closed, f"write to {self.path} after close"
        assert isinstance(result, DocResult), f"expected a DocResult, got {type(result).__name__}"
        assert result.doc_id not in self._doc_ids, (
            f"duplicate doc_id {result.doc_id!r} written to {self.path}: every input document "
            f"must yield exactly one row (a merge or retry bug?)"
        )
        self._doc_ids.add(result.doc_id)
        self._rows.append(result.to_row())
        self.num_rows += 1
        if len(self._rows) >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        batch = _to_batch(self._rows, self.path)  # both formats: rows must fit the schema
        if self._parquet is not None:
            self._parquet.write_batch(batch)
        else:
            assert self._jsonl is not None
            self._jsonl.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in self._rows)
        self._rows.clear()

    def _close_file(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._stream is not None and not self._stream.closed:
            self._stream.close()

    def close(self) -> None:
        """Flush, then rename the temp file to `path`."""
        if self._closed:
            return
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._close_file()
        if isinstance(self.path, Location):
            self.tmp_path.move_to(self.path)
        else:
            os.replace(self.tmp_path, self.path)
        logger.info("wrote %d rows to %s", self.num_rows, self.path)

    def abort(self) -> None:
        """Drop everything written: remove the temp file, leave `path` untouched."""
        if self._closed:
            return
        self._closed = True
        self._rows.clear()
        try:
            self._close_file()
        finally:
            if isinstance(self.tmp_path, Location):
                self.tmp_path.delete()
            else:
                self.tmp_path.unlink(missing_ok=True)
        logger.warning("aborted %s after %d rows; nothing written", self.path, self.num_rows)


def read_results(path: str | Path, format: str | None = None) -> list[dict[str, Any]]:
    """All rows of a results file as dicts with OUTPUT_SCHEMA's keys. `format` defaults to
    the suffix (.parquet, .jsonl). `path` may be a URI."""
    path = open_local_or_remote(path)
    if format is None:
        format = {".parquet": "parquet", ".jsonl": "jsonl"}.get(path.suffix.lower())
    if format == "parquet":
        if isinstance(path, Location):
            return pq.read_table(path.path, filesystem=path.fs).to_pylist()
        return pq.read_table(path).to_pylist()
    if format == "jsonl":
        f = (io.TextIOWrapper(path.open_read(), encoding="utf-8") if isinstance(path, Location)
             else open(path, encoding="utf-8"))
        with f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"results file {str(path)!r}: unknown format {format or path.suffix!r}; "
                     f"use .parquet or .jsonl, or pass format")
