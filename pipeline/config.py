"""Run settings: `RunConfig`, derived from `pipeline.settings`; model pools; the fingerprint.

    RunConfig(model=..., workers=2)                       one pool, "default" (the shorthand)
    RunConfig(pools=[{"name": "moe", "model": ...},        named pools; a pool's unset
                     {"name": "swa", "model": ..., "workers": 2}],   settings inherit the top level
              routes=["tokens >= 32000 -> swa"])           first match wins, else the first pool

Validated at construction (`ValueError` naming the setting and the fix).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, field, fields, make_dataclass
from typing import Any

from pipeline.settings import (
    BY_NAME,
    DEFAULT_MODEL,
    DTYPE_CHOICES,
    KV_CHOICES,
    POOL_SETTINGS,
    SETTINGS,
    STRATEGIES,
    SettingError,
    recommended,
    validate,
)

__all__ = ["DEFAULT_MODEL", "DEFAULT_POOL", "DTYPE_CHOICES", "KV_CHOICES", "STRATEGIES",
           "PoolConfig", "RunConfig", "SettingError"]

DEFAULT_POOL = "default"
POOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _annotation(s) -> str:
    t = s.type.__name__
    return f"{t} | None" if s.nullable else t


class _PoolMethods:
    __slots__ = ()

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def resolved_dtypes(self) -> tuple[str, str]:
        """(compute dtype, KV cache dtype) names as the pool's replicas will run them: "auto"
        resolved on this machine for the replicas' device (a cluster's CPU replicas are
        assumed to be of the driver's kind; they are given the resolved names)."""
        from models.dtypes import dtype_name, resolve_dtype, resolve_kv_cache_dtype

        dtype = resolve_dtype(self.dtype, self.device)
        return dtype_name(dtype), dtype_name(
            resolve_kv_cache_dtype(self.kv_cache_dtype, dtype, self.device))

    def _fingerprint_part(self, batch_invariant: bool) -> dict[str, Any]:
        dtype, kv_dtype = self.resolved_dtypes()
        data = {"model": self.model, "dtype": dtype}
        if kv_dtype != dtype:  # absent when equal: fingerprints from before the setting hold
            data["kv_cache_dtype"] = kv_dtype
        # packed weights round differently (within fp32 bounds); absent for dequantized ones
        if not (self.quantization == "none" or (self.quantization == "auto" and batch_invariant)):
            data["quantization"] = self.quantization
        return data


# One model pool: its name and every pool-scope setting, resolved (none inherited any more).
PoolConfig = make_dataclass(
    "PoolConfig",
    [("name", str)] + [(s.name, _annotation(s), field(default=s.default)) for s in POOL_SETTINGS],
    bases=(_PoolMethods,), slots=True,
)
PoolConfig.__module__ = __name__


class _RunMethods:
    __slots__ = ()

    def __post_init__(self) -> None:
        self._resolve_recommended()
        checked = validate({s.name: getattr(self, s.name) for s in SETTINGS})
        for name, value in checked.items():
            setattr(self, name, value)
        pools = self.pool_configs()  # validates pools
        if self.routes is not None:
            if isinstance(self.routes, str) or not isinstance(self.routes, (list, tuple)):
                raise ValueError(f"routes={self.routes!r}: must be a list of rules such as "
                                 f"\"tokens >= 32000 -> {pools[0].name}\"")
            from pipeline.routing import parse_routes

            self.routes = list(self.routes)
            parse_routes(self.routes, [p.name for p in pools])

    def _resolve_recommended(self) -> None:
        """strategy "auto", chunk_tokens / overlap / penalize_prompt None: the values
        recommended for the run's model (the first pool's), pipeline.settings.recommended().
        Resolved here, so the fingerprint, the output rows and every later step see the values
        the run uses."""
        model = self.model
        if isinstance(self.pools, (list, tuple)) and self.pools:
            first = self.pools[0]
            first = asdict(first) if isinstance(first, PoolConfig) else first
            if isinstance(first, dict) and isinstance(first.get("model"), str):
                model = first["model"]
        rec = recommended(model if isinstance(model, str) else "")
        if self.strategy == "auto":
            self.strategy = rec["strategy"]
        if self.chunk_tokens is None:
            self.chunk_tokens = rec["chunk_tokens"]
        if self.penalize_prompt is None:
            self.penalize_prompt = rec["penalize_prompt"]
        if self.overlap is None:
            # the recommended overlap, or less when an explicit chunk size is smaller
            size = self.chunk_tokens
            fits = isinstance(size, int) and not isinstance(size, bool)
            self.overlap = min(rec["overlap"], max(0, size // 2 - 1)) if fits else rec["overlap"]

    # -- pools ------------------------------------------------------------------------------
    def pool_configs(self) -> list[PoolConfig]:
        """The run's pools, each setting resolved: an unset pool setting inherits the top
        level. Without `pools`, one pool named "default" of the top-level settings."""
        inherited = {s.name: getattr(self, s.name) for s in POOL_SETTINGS}
        if self.pools is None:
            return [PoolConfig(name=DEFAULT_POOL, **inherited)]
        if isinstance(self.pools, (str, dict)) or not isinstance(self.pools, (list, tuple)):
            raise ValueError(f"pools={self.pools!r}: must be a list of pools (name, model, ...)")
        if not self.pools:
            raise ValueError("pools=[]: the pool list is empty; give at least one pool "
                             "(name and model), or leave pools out for one default pool")
        out: list[PoolConfig] = []
        for i, raw in enumerate(self.pools):
            values = asdict(raw) if isinstance(raw, PoolConfig) else raw
            if not isinstance(values, dict):
                raise ValueError(f"pools[{i}]={raw!r}: each pool is a table of name, model, ...")
            name = values.get("name")
            where = f"pools[{i}]"
            if not isinstance(name, str) or not POOL_NAME.fullmatch(name):
                raise ValueError(f"{where}.name={name!r}: give each pool a name of letters, "
                                 f"digits, '_', '-' or '.', starting with a letter or '_'")
            where = f"pool {name!r}"
            if any(p.name == name for p in out):
                raise ValueError(f"{where}: duplicate pool name; give each pool its own name")
            unknown = sorted(set(values) - {"name"} - {s.name for s in POOL_SETTINGS})
            if unknown:
                raise ValueError(
                    f"{where}: unknown setting {unknown[0]!r}; a pool may set "
                    f"{', '.join(s.name for s in POOL_SETTINGS)}")
            merged = {**inherited, **{k: v for k, v in values.items() if k != "name"}}
            try:
                merged = {**merged, **validate({**self._run_values(), **merged})}
            except SettingError as exc:
                raise ValueError(f"{where}: {exc}") from None
            out.append(PoolConfig(name=name, **{s.name: merged[s.name] for s in POOL_SETTINGS}))
        return out

    def _run_values(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in SETTINGS if s.scope == "run"}

    @property
    def pool_names(self) -> list[str]:
        return [p.name for p in self.pool_configs()]

    @property
    def device(self) -> str:
        """The top-level (default) pool's device."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    def resolved_dtypes(self) -> tuple[str, str]:
        """The first pool's (compute dtype, KV cache dtype), resolved."""
        return self.pool_configs()[0].resolved_dtypes()

    # -- fingerprint ------------------------------------------------------------------------
    def fingerprint(self, weights_hash: str | dict[str, str], prompt_version: str) -> str:
        """Hash of everything that changes an output: same document + same fingerprint ->
        same output (greedy), so finished work can be skipped or resumed by key.

        `weights_hash`: one hash (one pool) or pool name -> hash. A one-pool run without
        routes hashes as before pools existed; otherwise every pool and rule is covered."""
        data = {s.name: getattr(self, s.name) for s in SETTINGS if s.output and s.scope == "run"}
        if not data.get("expert_tokens_per_layer"):  # off: fingerprints as before it existed
            data.pop("expert_tokens_per_layer", None)
        pools = self.pool_configs()
        hashes = weights_hash if isinstance(weights_hash, dict) else {
            pools[0].name: weights_hash}
        if len(pools) == 1 and not self.routes:
            data.update(pools[0]._fingerprint_part(self.batch_invariant))
            data["weights"] = hashes[pools[0].name]
        else:
            data["pools"] = [{"name": p.name, **p._fingerprint_part(self.batch_invariant),
                              "weights": hashes[p.name]}
                             for p in pools]
            from pipeline.routing import parse_routes

            data["routes"] = [r.text for r in parse_routes(self.routes or [], [p.name for p in pools])]
        if self.temperature > 0:  # absent for greedy runs, which take no seed
            data["seeding"] = "per-request"  # before: every request sampled with `seed` itself
        data["prompts"] = prompt_version
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


RunConfig = make_dataclass(
    "RunConfig",
    [(s.name, _annotation(s), field(default=s.default)) for s in SETTINGS] + [
        # named model pools (dicts of pool settings, or PoolConfig); None: one default pool
        ("pools", "list | None", field(default=None)),
        # routing rules, "CONDITION -> POOL" (pipeline.routing); first match wins
        ("routes", "list[str] | None", field(default=None)),
        ("extra", "dict[str, Any]", field(default_factory=dict)),
    ],
    bases=(_RunMethods,), slots=True,
)
RunConfig.__module__ = __name__
RunConfig.__doc__ = ("Every setting of a run (pipeline.settings.SETTINGS) plus its pools and "
                     "routing rules.")
assert set(BY_NAME) <= set(RunConfig.__dataclass_fields__), "a setting without a field"
