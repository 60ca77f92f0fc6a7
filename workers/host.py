"""An engine on a background thread: requests go in, finished results come out.

This is the body of a model replica. `EngineHost` keeps the engine stepping while requests
arrive, so batches stay full as documents come and go; the Ray actor (`workers.actor`) and the
in-process pool (`workers.pool.LocalPool`) both wrap it. It takes and returns plain data.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

TIMELINE_START_S = 0.5  # first interval between KV-usage samples
TIMELINE_MAX = 1024  # samples kept per replica


@dataclass(slots=True)
class EngineSpec:
    """Everything a replica needs to build its engine (plain, picklable data)."""

    model: str
    dtype: str = "auto"  # models.dtypes: resolved on the replica's device
    device: str | None = None  # None: cuda when visible, else cpu
    num_threads: int | None = None  # torch intra-op threads on CPU
    quantization: str = "auto"  # GGUF weights: "gguf" packed, "none" dequantized (models.quant)
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    # Called with each engine a replica builds (fault drills in tests; travels with the spec).
    engine_hook: Callable[[Any], None] | None = None


@dataclass(slots=True)
class WorkRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # SamplingParams fields
    # affinity key (workers.router): "" for none; "DOC" or "DOC#SUB", released per DOC
    routing_key: str = ""
    pool: str = ""  # the model pool that must serve it; "": the first


@dataclass(slots=True)
class WorkResult:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    expert_token_counts: list[int] | None = None
    expert_token_counts_per_layer: list[list[int]] | None = None  # [MoE layer][expert]
    latency_s: float = 0.0
    first_token_s: float | None = None  # submit to first generated token (prefill + queueing)
    replica: int = -1
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineFailed(RuntimeError):
    """The replica's engine thread raised: the replica must be rebuilt. `cause` is one line."""

    def __init__(self, replica: int, cause: str, detail: str = "") -> None:
        super().__init__(f"replica {replica} engine failed: {cause}\n{detail}".rstrip())
        self.replica = replica
        self.cause = cause
        self.detail = detail

    def __reduce__(self):  # picklable (it crosses from an actor to the driver)
        return (EngineFailed, (self.replica, self.cause, self.detail))


def build_engine(spec: EngineSpec):
    import torch

    from models import EngineConfig, LLMEngine, load_model
    from models.llm import default_device

    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    from models.quant import engine_quantization

    loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device or default_device(),
                        quantization=engine_quantization(
                            spec.quantization, spec.engine.get("batch_invariant", False)))
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(**spec.engine))
    return engine, loaded


class EngineHost:
    def __init__(self, spec: EngineSpec, replica: int = 0, engine=None) -> None:
        self.replica = replica
        if engine is None:
            engine, _ = build_engine(spec)
        if spec.engine_hook is not None:
            spec.engine_hook(engine)
        self.engine = engine
        self._intake: deque[WorkRequest] = deque()
        self._done: list[WorkResult] = []
        self._aborts: list[str] = []
        self._cond = threading.Condition()
        self._stop = False
        self._failure: EngineFailed | None = None  # the engine thread's failure, once it raised
        self._submitted_at: dict[str, float] = {}
        # KV-cache usage over time, for the run report: [wall clock s, usage 0-1, running,
        # waiting], sampled after a step at most every `_sample_every` s; when full, every
        # other sample is dropped and the interval doubles, so a long run stays bounded.
        self.kv_timeline: list[list[float]] = []
        self._sample_every = TIMELINE_START_S
        self._thread = threading.Thread(target=self._loop, name=f"engine-{replica}", daemon=True)
        self._thread.start()

    # -- called by clients (any thread) -----------------------------------------------------
    def submit(self, requests: list[WorkRequest]) -> None:
        with self._cond:
            if self._failure:
                raise self._failure
            self._intake.extend(requests)
            self._cond.notify_all()

    def collect(self, timeout: float = 1.0) -> list[WorkResult]:
        """Finished results since the last call; waits up to `timeout` s for at least one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._done and not self._failure:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._failure and not self._done:
                raise self._failure
            done, self._done = self._done, []
            return done

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()  # a snapshot; counters may move while it is taken
        stats["replica"] = self.replica
        stats["queued"] = len(self._intake)
        stats["kv_timeline"] = list(self.kv_timeline)
        return stats

    def _sample(self) -> None:
        now = time.time()
        if self.kv_timeline and now - self.kv_timeline[-1][0] < self._sample_every:
            return
        sched = getattr(self.engine, "scheduler", None)
        blocks = getattr(self.engine, "block_manager", None)
        if sched is None or blocks is None:  # an engine stand-in without a KV cache
            return
        self.kv_timeline.append([now, float(blocks.usage), len(sched.running),
                                 len(sched.waiting)])
        if len(self.kv_timeline) >= TIMELINE_MAX:
            del self.kv_timeline[1::2]
            self._sample_every *= 2

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify_all()

    @property
    def is_failed(self) -> bool:
        return self._failure is not None

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- the stepping thread ----------------------------------------------------------------
    def _admit(self, requests: list[WorkRequest]) -> list[WorkResult]:
        from models import SamplingParams

        failed = []
        for req in requests:
            self._submitted_at[req.request_id] = time.perf_counter()
            try:
                self.engine.add_request(req.request_id, req.prompt_token_ids,
                                        SamplingParams(**req.sampling))
            except (ValueError, TypeError) as exc:  # a bad request fails alone
                failed.append(WorkResult(req.request_id, replica=self.replica, error=str(exc)))
                self._submitted_at.pop(req.request_id, None)
        return failed

    def _result(self, out, now: float) -> WorkResult:
        submitted = self._submitted_at.pop(out.request_id, now)
        first = getattr(getattr(out, "metrics", None), "first_token_time", None)
        return WorkResult(
            request_id=out.request_id, text=out.text, token_ids=out.token_ids,
            finish_reason=out.finish_reason, num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            num_generated_tokens=out.num_generated_tokens,
            expert_token_counts=out.expert_token_counts,
            expert_token_counts_per_layer=getattr(out, "expert_token_counts_per_layer", None),
            latency_s=now - submitted, replica=self.replica,
            first_token_s=None if first is None else max(0.0, first - submitted),
        )

    def _loop(self) -> None:
        # Only this thread touches the engine; clients exchange data under the lock between
        # steps, so a long step never blocks `submit` or `collect`.
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._intake or self._aborts
                               or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stop:
                        return
                    intake, self._intake = list(self._intake), deque()
                    aborts, self._aborts = self._aborts, []
                done = self._admit(intake)
                for rid in aborts:
                    self.engine.abort(rid)
                    self._submitted_at.pop(rid, None)
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    now = time.perf_counter()
                    self._sample()
                    done += [self._result(out, now) for out in outputs]
                if done:
                    with self._cond:
                        self._done.extend(done)
                        self._cond.notify_all()
        except Exception as exc:  # a bug or OOM in the engine: report it to every client call
            with self._cond:
                cause = (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0][:500]
                self._failure = EngineFailed(self.replica, cause, traceback.format_exc(limit=5))
                self._cond.notify_all()
            logger.error("replica %d engine failed:\n%s", self.replica, self._failure.detail)
