"""Job files (TOML): what to read, where to write, which model and settings, when to run.

A job file is data: it is parsed with `tomllib` and validated field by field; nothing in it is
executed. Unknown keys, wrong types and impossible values raise `JobSpecError` naming the key
and the fix. Example (examples/jobs/sotu.toml):

    [input]
    path = "examples/sotu"          # relative paths are relative to the job file
    [output]
    path = "out/sotu"               # a directory: Parquet parts, the ledger, the state DB
    [model]
    name = "smollm2-135m-instruct"
    [strategy]
    name = "map-reduce"
    [schedule]
    cron = "0 2 * * *"
    timezone = "Europe/Paris"       # the cron's wall clock; default "UTC"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import STRATEGIES, RunConfig


class JobSpecError(ValueError):
    """The job file is invalid; the message names the file, the key and the fix."""


# section -> key -> (type(s), RunConfig field or None, default)
_INT, _FLOAT, _STR, _BOOL = int, (int, float), str, bool
SCHEMA: dict[str, dict[str, tuple[Any, str | None, Any]]] = {
    "job": {"name": (_STR, None, None)},
    "input": {
        "path": (_STR, None, None),
        "glob": (_STR, None, "**/*"),
        "id_column": (_STR, None, "id"),
        "text_column": (_STR, None, "text"),
        "limit": (_INT, None, None),
    },
    "output": {"path": (_STR, None, None)},
    "model": {"name": (_STR, "model", None), "dtype": (_STR, "dtype", None),
              "kv_cache_dtype": (_STR, "kv_cache_dtype", None)},
    "engine": {
        "max_num_seqs": (_INT, "max_num_seqs", None),
        "max_num_batched_tokens": (_INT, "max_num_batched_tokens", None),
        "kv_cache_memory_bytes": (_INT, "kv_cache_memory_bytes", None),
        "batch_invariant": (_BOOL, "batch_invariant", None),
    },
    "chunking": {
        "chunk_tokens": (_INT, "chunk_tokens", None),
        "overlap": (_INT, "overlap", None),
        "encoding": (_STR, "encoding", None),
    },
    "strategy": {
        "name": (_STR, "strategy", None),
        "task": (_STR, "task", None),
        "reduce_task": (_STR, "reduce_task", None),
        "max_summary_tokens": (_INT, "max_summary_tokens", None),
        "context_summary_tokens": (_INT, "context_summary_tokens", None),
        "temperature": (_FLOAT, "temperature", None),
        "repetition_penalty": (_FLOAT, "repetition_penalty", None),
        "seed": (_INT, "seed", None),
    },
    "resources": {
        "workers": (_INT, "workers", None),
        "num_gpus": (_FLOAT, "num_gpus", None),
        "address": (_STR, "address", None),
        "use_ray": (_BOOL, "use_ray", None),
        "max_inflight_docs": (_INT, "max_inflight_docs", None),
        "restart_timeout_s": (_FLOAT, "restart_timeout_s", None),
    },
    "schedule": {"cron": (_STR, None, None), "missed": (_STR, None, "skip"),
                 "timezone": (_STR, None, "UTC")},
}
REQUIRED = [("input", "path"), ("output", "path")]
MISSED_POLICIES = ("skip", "run-once")


@dataclass(slots=True)
class JobSpec:
    name: str
    source: Path  # the job file
    input_path: Path
    output_dir: Path
    run: RunConfig
    glob: str = "**/*"
    id_column: str = "id"
    text_column: str = "text"
    limit: int | None = None
    cron: str | None = None
    missed: str = "skip"  # what to do with ticks missed while nothing ran
    timezone: str = "UTC"  # the cron's wall clock (an IANA zone name)
    raw: dict[str, Any] = field(default_factory=dict)


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return "number"
    return {int: "integer", str: "string", bool: "true/false"}[t]


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobSpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read job file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    return parse_job(raw, path)


def parse_job(raw: dict[str, Any], path: Path) -> JobSpec:
    values: dict[tuple[str, str], Any] = {}
    for section, body in raw.items():
        if section not in SCHEMA:
            raise JobSpecError(
                f"{path}: unknown section [{section}]; valid sections: {', '.join(SCHEMA)}"
            )
        if not isinstance(body, dict):
            raise JobSpecError(f"{path}: {section} must be a [{section}] table")
        for key, value in body.items():
            if key not in SCHEMA[section]:
                raise JobSpecError(
                    f"{path}: unknown key {section}.{key}; valid keys in [{section}]: "
                    f"{', '.join(SCHEMA[section])}"
                )
            want = SCHEMA[section][key][0]
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if not ok:
                raise JobSpecError(
                    f"{path}: {section}.{key} = {value!r} should be a {_type_name(want)}"
                )
            values[(section, key)] = value
    for section, key in REQUIRED:
        if (section, key) not in values:
            raise JobSpecError(f"{path}: missing {section}.{key}; add it under [{section}]")

    run_kwargs = {}
    for (section, key), value in values.items():
        field_name = SCHEMA[section][key][1]
        if field_name:
            run_kwargs[field_name] = value
    if run_kwargs.get("strategy", "map-reduce") not in STRATEGIES:
        raise JobSpecError(
            f"{path}: strategy.name = {run_kwargs['strategy']!r}; use one of {', '.join(STRATEGIES)}"
        )
    try:
        run = RunConfig(**run_kwargs)
    except ValueError as exc:
        # RunConfig names its own field; map it back to the job file's key.
        raise JobSpecError(f"{path}: {exc}") from None

    def get(section: str, key: str):
        return values.get((section, key), SCHEMA[section][key][2])

    base = path.parent
    missed = get("schedule", "missed")
    if missed not in MISSED_POLICIES:
        raise JobSpecError(f"{path}: schedule.missed = {missed!r}; use {' or '.join(MISSED_POLICIES)}")
    cron = get("schedule", "cron")
    if cron is not None:
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise JobSpecError(f"{path}: schedule.cron = {cron!r} is not a valid cron expression "
                               "(five fields: minute hour day month weekday)")
    timezone = get("schedule", "timezone")
    _check_timezone(path, timezone)
    limit = get("input", "limit")
    if limit is not None and limit < 1:
        raise JobSpecError(f"{path}: input.limit = {limit}; must be at least 1")
    return JobSpec(
        name=get("job", "name") or path.stem,
        source=path,
        input_path=(base / get("input", "path")).resolve(),
        output_dir=(base / get("output", "path")).resolve(),
        run=run,
        glob=get("input", "glob"),
        id_column=get("input", "id_column"),
        text_column=get("input", "text_column"),
        limit=limit,
        cron=cron,
        missed=missed,
        timezone=timezone,
        raw=raw,
    )


def _check_timezone(path: Path, name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise JobSpecError(
            f"{path}: schedule.timezone = {name!r} is not a known time zone; use an IANA name "
            f"such as \"UTC\", \"Europe/Paris\" or \"America/New_York\" (leave it out for UTC)"
        ) from None
