"""Wiring for one run: model description on the driver, the replica pool, the runner, output.

Used by `docpipe run` and by `jobs`. Configuration problems raise `ConfigError` before any
work starts; per-document problems become error rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import PREFILL_ALIGN, RunConfig
from pipeline.output import ResultWriter
from pipeline.runner import PipelineRunner, PromptFitter, RunStats, largest_mergeable_summary
from pipeline.stores import Document
from workers.host import EngineSpec

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A run cannot start as configured; the message names the setting and the fix."""


def engine_spec(config: RunConfig) -> EngineSpec:
    engine = dict(max_num_seqs=config.max_num_seqs,
                  max_num_batched_tokens=config.max_num_batched_tokens,
                  batch_invariant=config.batch_invariant, prefill_align_tokens=PREFILL_ALIGN)
    # Replicas get the resolved names, so every one computes what the fingerprint says.
    dtype, engine["kv_cache_dtype"] = config.resolved_dtypes()
    if config.kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
    device = config.device
    threads = None
    if device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // config.workers)
    return EngineSpec(model=config.model, dtype=dtype, device=device,
                      num_threads=threads, engine=engine)


def describe(config: RunConfig):
    """Tokenizer, context length and identity of the model, without loading its weights."""
    from models.errors import ModelLoadError
    from models.loading import describe_model

    try:
        info = describe_model(config.model)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    if info.tokenizer is None:
        raise ConfigError(
            f"model {config.model!r} has no tokenizer (tokenizer.json); docpipe needs one to build prompts"
        )
    return info


MERGING_STRATEGIES = ("map-reduce", "overlap-summary")


def check_merge_fits(config: RunConfig, info) -> None:
    """Two pieces of `max_summary_tokens` and the merge prompt must fit the model's context,
    else a merge level could never pair pieces."""
    if config.strategy not in MERGING_STRATEGIES:
        return
    largest = largest_mergeable_summary(PromptFitter(info.tokenizer, info.max_model_len), config)
    if config.max_summary_tokens <= largest:
        return
    if largest < 1:
        raise ConfigError(
            f"strategy {config.strategy!r}: the model's context of {info.max_model_len} tokens "
            f"cannot hold a merge prompt with two summaries; shorten reduce_task, or use "
            f"strategy refine")
    raise ConfigError(
        f"max_summary_tokens={config.max_summary_tokens} is too large for the model's context "
        f"of {info.max_model_len} tokens: a merge prompt must hold two summaries of that size, "
        f"its instructions and a merged summary; set max_summary_tokens to at most {largest} "
        f"(--max-summary-tokens, or max_summary_tokens under [strategy] in a job file)")


@contextmanager
def open_pool(config: RunConfig, engine=None):
    """A LocalPool (in-process) or a RayPool of `config.workers` replicas."""
    from workers.pool import LocalPool, RayPool, init_ray

    spec = engine_spec(config)
    if engine is not None or not config.use_ray:
        pool = LocalPool(spec, engine=engine, restart_timeout_s=config.restart_timeout_s)
    else:
        try:
            init_ray(config.address)
        except Exception as exc:
            where = config.address or "a local instance"
            raise ConfigError(f"cannot start or join Ray at {where}: {exc}; check --address") from None
        import ray

        total_cpus = ray.cluster_resources().get("CPU", 1)
        cpus = max(1.0, min(float(spec.num_threads or 1), total_cpus / config.workers))
        pool = RayPool(spec, num_replicas=config.workers, num_cpus=cpus, num_gpus=config.num_gpus,
                       restart_timeout_s=config.restart_timeout_s)
    try:
        yield pool
    finally:
        pool.close()


def run_documents(
    config: RunConfig,
    documents: Iterable[Document],
    output: str | Path,
    fmt: str = "parquet",
    *,
    pool=None,
    on_progress: Callable[[RunStats], None] | None = None,
    cached=None,
    on_result=None,
) -> tuple[RunStats, list[dict]]:
    """Run the pipeline over `documents`, writing one row per document to `output`.

    Returns the run's stats and the replicas' engine stats."""
    info = describe(config)
    check_merge_fits(config, info)

    def go(p) -> tuple[RunStats, list[dict]]:
        runner = PipelineRunner(config, p, info.tokenizer, info.max_model_len, info.model_id,
                                info.weights_hash, cached=cached, on_result=on_result,
                                on_progress=on_progress)
        with ResultWriter(output, fmt) as writer:
            stats = runner.run(documents, writer.write)
        replica_stats = p.stats()
        stats_restarts = getattr(p, "num_restarts", 0)
        for s in replica_stats:
            s["num_restarts"] = stats_restarts
        return stats, replica_stats

    if pool is not None:
        return go(pool)
    with open_pool(config) as p:
        return go(p)
