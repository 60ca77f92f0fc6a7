"""Per-request timings of a run, recorded for `docpipe report` (pipeline.report).

One row per model result the runner delivers (the `on_result` hook), written when the run
ends as a hidden Arrow IPC file beside the output:

- `docpipe run ... -o dir/out.parquet`  -> `dir/_out.parquet.requests.arrow`
- a job directory                       -> `_requests/run-<run id>.arrow` (one per run)

Names start with `_` and do not end in `.parquet`, so dataset readers of the output skip them
(DuckDB's `read_parquet('dir')` reads every `.parquet` below a directory, `_` or not).
Columns (REQUEST_SCHEMA):
doc_id, request_id, stage (map, ctx, refine, reduce<level>), index, pool, replica, start_s and
finish_s (seconds since the run began, on the driver's clock: finish is when the result
arrived, start is finish minus the replica's `latency_s`), first_token_s (when the first
token was sampled, start plus the replica's submit-to-first-token time: before it the request
queued and prefilled, after it it decoded), latency_s, prompt/cached/generated tokens,
from_store (served from a job's stored results: no model work in this run). The file's schema
metadata holds the replicas' closing stats (`replica_stats`, JSON; each replica's
`kv_timeline` of [seconds since the run began, KV-cache usage, running, waiting] samples) and
the run's wall time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from pipeline.fs import Location, open_local_or_remote, unique_token

REQUEST_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string()),
    pa.field("request_id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("index", pa.int32()),
    pa.field("pool", pa.string()),
    pa.field("replica", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("finish_s", pa.float64()),
    pa.field("first_token_s", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("generated_tokens", pa.int64()),
    pa.field("from_store", pa.bool_()),
])


def sidecar_path(output: str | Path) -> Path | Location:
    """Where `docpipe run -o OUTPUT` keeps its request log."""
    where = open_local_or_remote(output)
    return where.with_name(f"_{where.name}.requests.arrow")


class RequestLog:
    """Collects one row per delivered result; `hooks` wrap a run's `cached` / `on_result`."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.started_at = time.time()
        self.rows: list[dict] = []
        self._from_store: set[str] = set()

    def hooks(self, cached: Callable | None = None,
              on_result: Callable | None = None) -> tuple[Callable | None, Callable]:
        def cached_hook(request_id: str):
            hit = cached(request_id)
            if hit is not None:
                self._from_store.add(request_id)
            return hit

        def on_result_hook(doc, request, result) -> None:
            self.record(doc, request, result)
            if on_result is not None:
                on_result(doc, request, result)

        return (cached_hook if cached is not None else None), on_result_hook

    def record(self, doc, request, result) -> None:
        finish = time.perf_counter() - self.t0
        stored = result.request_id in self._from_store
        latency = 0.0 if stored else float(result.latency_s or 0.0)
        start = max(0.0, finish - latency)
        ttft = None if stored else getattr(result, "first_token_s", None)
        self.rows.append(dict(
            doc_id=doc.doc_id, request_id=result.request_id, stage=request.stage,
            index=request.index, pool=None, replica=None if stored else result.replica,
            start_s=start, finish_s=finish, latency_s=latency,
            first_token_s=None if ttft is None else min(finish, start + ttft),
            prompt_tokens=result.num_prompt_tokens, cached_tokens=result.num_cached_tokens,
            generated_tokens=result.num_generated_tokens, from_store=stored))

    def table(self, replica_stats: list[dict] | None = None, wall_s: float | None = None) -> pa.Table:
        replica_to_pool = {r.get("replica"): r.get("pool", "default") for r in replica_stats or []}
        for row in self.rows:
            if row["replica"] is not None:
                row["pool"] = replica_to_pool.get(row["replica"], "default")
        replica_stats = [dict(r, kv_timeline=[[t - self.started_at, *rest]
                                              for t, *rest in r.get("kv_timeline") or []])
                         for r in replica_stats or []]
        meta = {"replica_stats": json.dumps(replica_stats, default=str),
                "wall_s": json.dumps(wall_s), "started_at": json.dumps(self.started_at)}
        return pa.Table.from_pylist(self.rows, schema=REQUEST_SCHEMA).replace_schema_metadata(meta)

    def write(self, path: Path | Location | str, replica_stats: list[dict] | None = None,
              wall_s: float | None = None) -> None:
        """Write atomically (a temporary name, then a rename or an object move)."""
        table = self.table(replica_stats, wall_s)
        path = open_local_or_remote(path) if isinstance(path, str) else path
        if isinstance(path, Location):
            tmp = path.with_name(f".{path.name}.tmp-{unique_token()}")
            with tmp.open_write() as sink:
                _write_ipc(table, sink)
            tmp.move_to(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with pa.OSFile(str(tmp), "wb") as sink:
                _write_ipc(table, sink)
            os.replace(tmp, path)


def _write_ipc(table: pa.Table, sink) -> None:
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_request_logs(paths: list[Path | Location]) -> tuple[pa.Table | None, list[dict], float | None]:
    """The request rows of one or more logs (each run's times shifted to follow the previous
    run's end), the replicas' stats of the last, and the total wall time."""
    tables, replica_stats, offset = [], [], 0.0
    for path in paths:
        source = path.open_random() if isinstance(path, Location) else pa.memory_map(str(path))
        with source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        wall = json.loads(meta.get("wall_s", "null")) or (
            max(table["finish_s"].to_pylist(), default=0.0))
        replica_stats = json.loads(meta.get("replica_stats", "[]"))
        for r in replica_stats:  # this run's samples follow the previous runs, as its rows do
            r["kv_timeline"] = [[t + offset, *rest] for t, *rest in r.get("kv_timeline") or []]
        import pyarrow.compute as pc

        table = table.set_column(table.schema.get_field_index("start_s"), "start_s",
                                 pc.add(table["start_s"], offset))
        table = table.set_column(table.schema.get_field_index("finish_s"), "finish_s",
                                 pc.add(table["finish_s"], offset))
        if "first_token_s" in table.column_names:
            table = table.set_column(table.schema.get_field_index("first_token_s"),
                                     "first_token_s", pc.add(table["first_token_s"], offset))
        else:  # a log written before first-token times were recorded
            table = table.append_column("first_token_s", pa.nulls(table.num_rows, pa.float64()))
        table = table.select([n for n in REQUEST_SCHEMA.names if n in table.column_names])
        tables.append(table.replace_schema_metadata(None))
        offset += wall
    if not tables:
        return None, [], None
    return pa.concat_tables(tables), replica_stats, offset
