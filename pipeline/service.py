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

from pipeline.config import PoolConfig, RunConfig
from pipeline.output import ResultWriter
from pipeline.routing import RouteTable
from pipeline.runner import PipelineRunner, PromptFitter, RunStats, largest_mergeable_summary
from pipeline.stores import Document
from workers.host import EngineSpec

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A run cannot start as configured; the message names the setting and the fix."""


def _threads_per_replica(config: RunConfig) -> int:
    """CPU replicas of all pools share the machine's cores evenly."""
    num_cpu_replicas = sum(p.workers for p in config.pool_configs() if p.device == "cpu")
    return max(1, (os.cpu_count() or 1) // max(1, num_cpu_replicas))


def engine_spec(config: RunConfig, pool: PoolConfig | None = None) -> EngineSpec:
    """What each replica of `pool` (default: the first) builds."""
    pool = pool or config.pool_configs()[0]
    engine = dict(max_num_seqs=pool.max_num_seqs,
                  max_num_batched_tokens=pool.max_num_batched_tokens,
                  batch_invariant=config.batch_invariant)
    # Replicas get the resolved names, so every one computes what the fingerprint says.
    dtype, engine["kv_cache_dtype"] = pool.resolved_dtypes()
    if pool.kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = pool.kv_cache_memory_bytes
    threads = _threads_per_replica(config) if pool.device == "cpu" else None
    return EngineSpec(model=pool.model, dtype=dtype, device=pool.device,
                      num_threads=threads, quantization=pool.quantization, engine=engine)


def _describe_model(model: str, where: str = ""):
    from models.errors import ModelLoadError
    from models.loading import describe_model

    try:
        info = describe_model(model)
    except ModelLoadError as exc:
        raise ConfigError(f"{where}{exc}") from None
    if info.tokenizer is None:
        raise ConfigError(
            f"{where}model {model!r} has no tokenizer (tokenizer.json); docpipe needs one to "
            f"build prompts")
    return info


def describe(config: RunConfig):
    """Tokenizer, context length and identity of the first pool's model, without loading its
    weights."""
    return _describe_model(config.pool_configs()[0].model)


def describe_pools(config: RunConfig) -> dict:
    """Pool name -> its model's description (tokenizer, context, weights hash); each model
    described once."""
    pools = config.pool_configs()
    by_model: dict[str, object] = {}
    out = {}
    for p in pools:
        if p.model not in by_model:
            by_model[p.model] = _describe_model(p.model, f"pool {p.name!r}: " if len(pools) > 1 else "")
        out[p.name] = by_model[p.model]
    return out


def route_columns(config: RunConfig) -> list[str]:
    """The store columns the routing rules read (`open_store(columns=...)`)."""
    return RouteTable(config.routes, config.pool_names).columns


def run_fingerprint(config: RunConfig, infos: dict | None = None) -> str:
    from pipeline.prompts import PROMPT_VERSION

    infos = infos or describe_pools(config)
    return config.fingerprint({name: info.weights_hash for name, info in infos.items()},
                              PROMPT_VERSION)


MERGING_STRATEGIES = ("map-reduce", "overlap-summary")


def check_merge_fits(config: RunConfig, info, pool: str | None = None) -> None:
    """Two pieces of `max_summary_tokens` and the merge prompt must fit the model's context,
    else a merge level could never pair pieces."""
    if config.strategy not in MERGING_STRATEGIES:
        return
    where = f"pool {pool!r}: " if pool else ""
    largest = largest_mergeable_summary(PromptFitter(info.tokenizer, info.max_model_len), config)
    if config.max_summary_tokens <= largest:
        return
    if largest < 1:
        raise ConfigError(
            f"{where}strategy {config.strategy!r}: the model's context of {info.max_model_len} tokens "
            f"cannot hold a merge prompt with two summaries; shorten reduce_task, or use "
            f"strategy refine")
    raise ConfigError(
        f"{where}max_summary_tokens={config.max_summary_tokens} is too large for the model's context "
        f"of {info.max_model_len} tokens: a merge prompt must hold two summaries of that size, "
        f"its instructions and a merged summary; set max_summary_tokens to at most {largest} "
        f"(--max-summary-tokens, or max_summary_tokens under [strategy] in a job file)")


def check_pools(config: RunConfig, infos: dict) -> None:
    """Every pool that may serve a merge must fit one (pools that only map need not)."""
    table = RouteTable(config.routes, list(infos))
    multi = len(infos) > 1
    for name in table.pools_for_stage("reduce"):
        check_merge_fits(config, infos[name], name if multi else None)


@contextmanager
def open_pool(config: RunConfig, engine=None):
    """A LocalPool (in-process) or a RayPool: each of the run's pools with its replicas."""
    from workers.pool import LocalPool, PoolSpec, RayPool, init_ray

    pools = config.pool_configs()
    specs = [PoolSpec(p.name, engine_spec(config, p), p.workers, 1.0, p.num_gpus) for p in pools]
    if engine is not None or not config.use_ray:
        with _load_errors_as_config_errors():
            pool = LocalPool(engine=engine, restart_timeout_s=config.restart_timeout_s,
                             pools=specs)
    else:
        try:
            init_ray(config.address)
        except Exception as exc:
            where = config.address or "a local instance"
            raise ConfigError(f"cannot start or join Ray at {where}: {exc}; check --address") from None
        import ray

        total_cpus = ray.cluster_resources().get("CPU", 1)
        num_replicas = sum(s.num_replicas for s in specs)
        for s in specs:
            s.num_cpus = max(1.0, min(float(s.engine.num_threads or 1), total_cpus / num_replicas))
        with _load_errors_as_config_errors():
            pool = RayPool(restart_timeout_s=config.restart_timeout_s, pools=specs)
    try:
        yield pool
    finally:
        pool.close()


@contextmanager
def _load_errors_as_config_errors():
    """A model that a replica cannot load (a bad file the up-front checks let through) is a
    configuration error: one `Error:` line naming the file and the fix, not a traceback. Over
    Ray the error arrives wrapped (RayTaskError / RayActorError): its cause is looked for."""
    from models.errors import ModelLoadError

    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        seen, cause = set(), exc
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, ModelLoadError):
                raise ConfigError(str(cause).strip().splitlines()[0]) from None
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
        raise


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

    Returns the run's stats and the replicas' engine stats (each names its pool)."""
    infos = describe_pools(config)
    check_pools(config, infos)

    def go(p) -> tuple[RunStats, list[dict]]:
        runner = PipelineRunner(config, p, infos, cached=cached, on_result=on_result,
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
