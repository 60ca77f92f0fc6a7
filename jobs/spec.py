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

Several model pools, and rules that route requests to them (first match wins, else the first
pool); `routes` must come before the first table:

    routes = ["tokens >= 32000 -> swa", "stage == reduce -> moe"]
    [[pools]]
    name = "moe"
    model = "path/to/an-moe-model.gguf"
    [[pools]]
    name = "swa"
    model = "gemma-3-270m"
    workers = 2

The run settings' sections and keys ([model], [engine], [chunking], [strategy],
[resources]) are declared once, in pipeline.settings.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.settings import JOB_SECTIONS, POOL_SETTINGS, Setting, SettingError, type_name


class JobSpecError(ValueError):
    """The job file is invalid; the message names the file, the key and the fix."""


# Job-file keys that are not run settings: section -> key -> (type, default)
_JOB_KEYS: dict[str, dict[str, tuple[type, object]]] = {
    "job": {"name": (str, None)},
    "input": {"path": (str, None), "glob": (str, "**/*"), "id_column": (str, "id"),
              "text_column": (str, "text"), "limit": (int, None)},
    "output": {"path": (str, None)},
    "schedule": {"cron": (str, None), "missed": (str, "skip"), "timezone": (str, "UTC")},
}
# The sections a job file may have, in documentation order; the run settings' sections come
# from pipeline.settings (one declaration of each setting).
SECTIONS = ["job", "input", "output", *JOB_SECTIONS, "schedule"]
TOP_LEVEL = ("pools", "routes")  # [[pools]] tables and the routes = [...] list
REQUIRED = [("input", "path"), ("output", "path")]
MISSED_POLICIES = ("skip", "run-once")


@dataclass(slots=True)
class JobSpec:
    name: str
    source: Path  # the job file
    input_path: Path | str  # a URI (s3://...) stays a str (pipeline.fs)
    output_dir: Path | str
    run: RunConfig
    glob: str = "**/*"
    id_column: str = "id"
    text_column: str = "text"
    limit: int | None = None
    cron: str | None = None
    missed: str = "skip"  # what to do with ticks missed while nothing ran
    timezone: str = "UTC"  # the cron's wall clock (an IANA zone name)
    raw: dict[str, Any] = field(default_factory=dict)


def _is(value: Any, want: type) -> bool:
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want) and not (want is not bool and isinstance(value, bool))


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


def _pools(path: Path, raw: Any) -> list[dict[str, Any]]:
    """[[pools]] tables, each key checked against the pool settings."""
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise JobSpecError(f"{path}: pools must be [[pools]] tables (name = ..., model = ...)")
    if not raw:
        raise JobSpecError(f"{path}: pools = [] is empty; add [[pools]] tables with a name and "
                           f"a model, or leave pools out for one pool of [model]")
    allowed: dict[str, Setting | None] = {"name": None, **{s.name: s for s in POOL_SETTINGS}}
    out = []
    for i, table in enumerate(raw):
        where = f"pools[{i}]" + (f" ({table['name']!r})" if isinstance(table.get("name"), str) else "")
        for key, value in table.items():
            if key not in allowed:
                raise JobSpecError(f"{path}: unknown key {key} in {where}; a pool may set "
                                   f"{', '.join(allowed)}")
            want = allowed[key].type if allowed[key] else str
            if not _is(value, want):
                raise JobSpecError(f"{path}: {where}.{key} = {value!r} should be {type_name(want)}")
        if "name" not in table:
            raise JobSpecError(f"{path}: {where} has no name; add name = \"...\" to it")
        out.append(dict(table))
    return out


def parse_job(raw: dict[str, Any], path: Path) -> JobSpec:
    values: dict[tuple[str, str], Any] = {}
    run_kwargs: dict[str, Any] = {}
    where_of: dict[str, str] = {}  # setting -> its key in this file
    for section, body in raw.items():
        if section in TOP_LEVEL:
            if section == "pools":
                run_kwargs["pools"] = _pools(path, body)
            else:
                if not isinstance(body, list) or not all(isinstance(r, str) for r in body):
                    raise JobSpecError(f"{path}: routes must be a list of strings such as "
                                       f"[\"tokens >= 32000 -> swa\"] (at the top of the file)")
                run_kwargs["routes"] = body
            continue
        if section not in SECTIONS:
            raise JobSpecError(
                f"{path}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}"
                f" (and [[pools]], routes)"
            )
        if not isinstance(body, dict):
            raise JobSpecError(f"{path}: {section} must be a [{section}] table")
        settings = JOB_SECTIONS.get(section, {})
        keys = list(_JOB_KEYS.get(section, {})) + list(settings)
        for key, value in body.items():
            if key not in keys:
                raise JobSpecError(
                    f"{path}: unknown key {section}.{key}; valid keys in [{section}]: "
                    f"{', '.join(keys)}"
                )
            if key in settings:
                setting = settings[key]
                if not _is(value, setting.type):
                    raise JobSpecError(f"{path}: {section}.{key} = {value!r} should be "
                                       f"{type_name(setting.type)}")
                run_kwargs[setting.name] = value
                where_of[setting.name] = f"{section}.{key}"
            else:
                want = _JOB_KEYS[section][key][0]
                if not _is(value, want):
                    raise JobSpecError(f"{path}: {section}.{key} = {value!r} should be "
                                       f"{type_name(want)}")
                values[(section, key)] = value
    for section, key in REQUIRED:
        if (section, key) not in values:
            raise JobSpecError(f"{path}: missing {section}.{key}; add it under [{section}]")
    try:
        run = RunConfig(**run_kwargs)
    except SettingError as exc:
        # name the setting as this file spells it
        s = next(s for t in JOB_SECTIONS.values() for s in t.values() if s.name == exc.name)
        key = where_of.get(exc.name, f"{s.section}.{s.job_key}")
        raise JobSpecError(f"{path}: {key} = {exc.value!r}: {exc.problem}") from None
    except ValueError as exc:
        raise JobSpecError(f"{path}: {exc}") from None

    def get(section: str, key: str):
        return values.get((section, key), _JOB_KEYS[section][key][1])

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
        input_path=_where(base, get("input", "path")),
        output_dir=_where(base, get("output", "path")),
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


def _where(base: Path, value: str) -> Path | str:
    """A path relative to the job file, or a URI as written (`file://` URIs become paths)."""
    from pipeline.fs import as_local_or_uri

    where = as_local_or_uri(value)
    return (base / where).resolve() if isinstance(where, Path) else where


def _check_timezone(path: Path, name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise JobSpecError(
            f"{path}: schedule.timezone = {name!r} is not a known time zone; use an IANA name "
            f"such as \"UTC\", \"Europe/Paris\" or \"America/New_York\" (leave it out for UTC)"
        ) from None
