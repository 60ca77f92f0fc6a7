"""The runner: many documents in flight, their requests fed to model replicas, one row each.

    documents (streamed) --> chunk --> strategy.start() --> prompts --> pool (replicas)
         ^ at most max_inflight_docs active                               |
         |                                                                v
    write(DocResult) <-- strategy done <-- strategy.on_output() <-- WorkResult

Nothing here is model-specific: the pool serves token ids; the `PromptFitter` applies the
model's chat template and keeps every prompt inside the model's context. A document whose
reading, chunking or any request fails becomes an error row; the others go on.

Hooks for resumable jobs: `cached(request_id)` may return a stored WorkResult (no model work),
and `on_result(doc, request, result)` sees every completed request as it arrives.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pipeline.accounting import TokenParams, params_per_token, request_flops
from pipeline.chunking import chunk_text
from pipeline.config import RunConfig
from pipeline.output import DocResult
from pipeline.prompts import PROMPT_VERSION, as_chat, piece_text, reduce_prompt
from pipeline.routing import RouteTable, request_stage
from pipeline.stores import Document
from pipeline.strategies import STRATEGY_CLASSES, DocumentStrategy, MergeBudget, Request
from workers.host import WorkRequest, WorkResult

logger = logging.getLogger(__name__)

# Tokens kept from the end of an over-long prompt (instructions at the end survive a cut).
_KEEP_TAIL = 64


class PromptFitter:
    """Chat template + context check with the model's own tokenizer.

    A prompt too long for the context is cut inside its user message, by token ids:

        [template head] [message head ... | cut | ... last _KEEP_TAIL tokens] [template tail]

    The template's own tokens (role markers, the generation prompt) are never cut, and the
    kept ids are never decoded and re-encoded, so the result fits exactly."""

    _SENTINEL = "\x00docpipe-user-message\x00"

    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.num_truncated = 0
        self._template_ids: tuple[list[int], list[int]] | None = None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def chat_overhead(self) -> int:
        return len(self.tokenizer.apply_chat_template(as_chat("")))

    def template_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the chat template before and after the user message."""
        if self._template_ids is None:
            text = self.tokenizer.apply_chat_template(as_chat(self._SENTINEL), tokenize=False)
            if text.count(self._SENTINEL) != 1:
                raise ValueError("the model's chat template does not place the user message "
                                 "verbatim; docpipe cannot cut an over-long prompt inside it")
            head, tail = text.split(self._SENTINEL)
            self._template_ids = (self.tokenizer.encode(head), self.tokenizer.encode(tail))
        return self._template_ids

    def encode(self, req: Request) -> list[int]:
        return self.fit(req)[0]

    def fit(self, req: Request) -> tuple[list[int], int]:
        """The prompt's token ids, and how many message tokens were cut to fit (0: none)."""
        ids = self.tokenizer.apply_chat_template(as_chat(req.prompt))
        limit = self.max_model_len - req.max_tokens - 1
        if len(ids) <= limit:
            return ids, 0
        head, tail = self.template_ids()
        msg = self.tokenizer.encode(req.prompt)
        room = limit - len(head) - len(tail)
        if room < 1:
            raise ValueError(f"the chat template alone ({len(head) + len(tail)} tokens) leaves no "
                             f"room for a prompt in the model's context of {self.max_model_len} "
                             f"with {req.max_tokens} tokens to generate")
        keep_tail = min(_KEEP_TAIL, room // 2)
        kept = msg[: room - keep_tail] + (msg[len(msg) - keep_tail:] if keep_tail else [])
        num_cut = len(msg) - len(kept)
        self.num_truncated += 1
        logger.warning("%s: prompt of %d tokens cut by %d to fit the model's context of %d",
                       req.request_id, len(ids), num_cut, self.max_model_len)
        return head + kept + tail, num_cut


def merge_overhead_tokens(fitter: PromptFitter, reduce_task: str | None) -> int:
    """Tokens of a merge prompt without its pieces: chat template and instructions."""
    return fitter.chat_overhead() + fitter.count(reduce_prompt([], reduce_task))


def largest_mergeable_summary(fitter: PromptFitter, config: RunConfig) -> int:
    """The largest `max_summary_tokens` for which two pieces of that size, with their labels,
    plus the merge prompt and room for a merged answer of that size fit the model's context:
    below it, every merge level pairs pieces and the merge ends."""
    overhead = merge_overhead_tokens(fitter, config.reduce_task)
    # "Part <n>: " and "\n\n", with a label longer than any document's piece count
    label = fitter.count(piece_text(10**6, "x")) - fitter.count("x")
    # overhead + 2 * (m + label) <= budget = max_model_len - m - 1
    return (fitter.max_model_len - 1 - overhead - 2 * label) // 3


@dataclass(slots=True)
class RunStats:
    num_docs: int = 0
    num_ok: int = 0
    num_failed: int = 0
    num_chunks: int = 0
    num_requests: int = 0
    num_cached_requests: int = 0  # served from a job's stored results (resume)
    num_tokens: int = 0  # document tokens (tiktoken)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the engines' prefix caches
    wall_s: float = 0.0
    num_truncated_prompts: int = 0  # prompts cut to fit the context (chunks too big for the model)
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _PoolSide:
    """What the runner needs of one model pool: its prompt fitting and identity."""

    name: str
    fitter: PromptFitter
    model_id: str
    dtype: str
    kv_cache_dtype: str
    merge_budget: MergeBudget
    params: TokenParams  # per token: active and dense-equivalent weights


@dataclass(slots=True)
class _DocState:
    doc: Document
    strategy: DocumentStrategy
    num_tokens: int
    t0: float
    plan: dict[str, str]  # rule stage -> pool, fixed when the document is chunked
    chunk_pools: dict[int, str] = field(default_factory=dict)  # chunk -> pool of its output
    chunk_experts: dict[int, list[int]] = field(default_factory=dict)  # chunk -> tokens per expert
    chunk_layer_experts: dict[int, list[list[int]]] = field(default_factory=dict)  # [layer][expert]
    active_flops: int = 0
    dense_flops: int = 0
    merge_pools: dict[tuple[int, int], str] = field(default_factory=dict)  # (level, group)
    last_pool: str = ""  # the pool of the last output: the summary's
    pending: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    expert_tokens: list[int] | None = None
    num_truncated_prompts: int = 0
    num_truncated_tokens: int = 0
    error: str | None = None


def doc_key(doc: Document, fingerprint: str) -> str:
    """Deterministic key of (doc_id, content, config): prefix of every request id."""
    raw = f"{doc.doc_id}\x00{doc.content_hash}\x00{fingerprint}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:24]


def request_seed(seed: int, request_id: str) -> int:
    """A request's sampling seed: reproducible (same run seed, same request id, same seed:
    request ids are deterministic) and distinct per request, so chunks are not all sampled
    from one random stream. 63 bits, a valid seed for torch.Generator."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class PipelineRunner:
    """`models`: pool name -> its model's description (`tokenizer`, `max_model_len`,
    `model_id`, `weights_hash`; models.loading.ModelInfo), in the config's pool order."""

    def __init__(self, config: RunConfig, pool, models: dict,
                 cached: Callable[[str], WorkResult | None] | None = None,
                 on_result: Callable[[Document, Request, WorkResult], None] | None = None,
                 on_progress: Callable[[RunStats], None] | None = None) -> None:
        self.config = config
        self.pool = pool
        pool_configs = {p.name: p for p in config.pool_configs()}
        assert list(models) == list(pool_configs), "one model description per pool, in order"
        self.routes = RouteTable(config.routes, list(models))
        self.sides: dict[str, _PoolSide] = {}
        for name, info in models.items():
            fitter = PromptFitter(info.tokenizer, info.max_model_len)
            overhead = merge_overhead_tokens(fitter, config.reduce_task)
            budget = MergeBudget(budget_tokens=info.max_model_len - config.max_summary_tokens - 1,
                                 overhead_tokens=overhead, count_tokens=fitter.count)
            dtype, kv_dtype = pool_configs[name].resolved_dtypes()
            self.sides[name] = _PoolSide(name, fitter, info.model_id, dtype, kv_dtype, budget,
                                         params_per_token(info.config))
        self.fingerprint = config.fingerprint(
            {name: info.weights_hash for name, info in models.items()}, PROMPT_VERSION)
        self.cached = cached
        self.on_result = on_result
        self.on_progress = on_progress
        self.stats = RunStats()
        self._active: dict[str, _DocState] = {}
        self._requests: dict[str, tuple[str, Request, str]] = {}  # id -> (doc key, request, pool)
        self._ready: deque[WorkResult] = deque()
        self._chunking: dict[int, Document] = {}  # chunk task tag -> document
        self._next_tag = 0

    # -- documents --------------------------------------------------------------------------
    def _start(self, doc: Document, write: Callable[[DocResult], None]) -> None:
        """Chunk a document: in a Ray task beside the replicas when the pool runs tasks (the
        driver only routes), else here; `_chunked` continues."""
        self.stats.num_docs += 1
        if doc.error is not None:
            self._write_error(doc, doc.error, write)
            return
        cfg = self.config
        args = (doc.text, cfg.chunk_tokens, cfg.overlap, cfg.encoding)
        submit_task = getattr(self.pool, "submit_task", None)
        if submit_task is not None:
            tag = self._next_tag = self._next_tag + 1
            self._chunking[tag] = doc
            submit_task(chunk_text, args, tag)
            return
        try:
            chunks = chunk_text(*args)
        except Exception as exc:  # one bad document never stops the run
            logger.debug("document %s failed to chunk", doc.doc_id, exc_info=True)
            self._write_error(doc, f"{type(exc).__name__}: {exc}", write)
            return
        self._chunked(doc, chunks, write)

    def _take_chunked(self, write) -> None:
        for tag, chunks, error in self.pool.task_results():
            doc = self._chunking.pop(tag)
            if error is not None:
                self._write_error(doc, error, write)
            else:
                self._chunked(doc, chunks, write)

    def _chunked(self, doc: Document, chunks, write: Callable[[DocResult], None]) -> None:
        try:
            if not chunks:
                raise ValueError(f"{doc.source}: document is empty; nothing to summarize")
            cfg = self.config
            num_tokens = chunks[-1].token_end
            plan = self.routes.plan(num_tokens, doc.metadata)
            strategy = STRATEGY_CLASSES[cfg.strategy](
                doc_key(doc, self.fingerprint), chunks, cfg.task, cfg.reduce_task,
                cfg.max_summary_tokens, self.sides[plan["reduce"]].merge_budget,
                cfg.context_summary_tokens,
            )
            state = _DocState(doc, strategy, num_tokens, time.perf_counter(), plan)
            key = strategy.doc_key
            if key in self._active:
                raise ValueError(f"{doc.source}: duplicate document (same id, text and config) in flight")
            self._active[key] = state
            self.stats.num_chunks += len(chunks)
            self.stats.num_tokens += num_tokens
            self._submit(state, strategy.start())
        except Exception as exc:  # one bad document never stops the run
            logger.debug("document %s failed to start", doc.doc_id, exc_info=True)
            state = self._active.get(doc_key(doc, self.fingerprint))
            if state is not None and state.doc is doc:
                self._fail(state, f"{type(exc).__name__}: {exc}", write)
            else:
                self._write_error(doc, f"{type(exc).__name__}: {exc}", write)

    def _affinity(self, key: str, req: Request) -> str:
        """The router's affinity key. Only overlap-summary's prompts share prefixes of whole
        alignment units: a chunk's map prompt and the next chunk's context prompt both begin
        with the chunk's text, so they go to one replica. Other requests share less than
        the 512 tokens a batch-invariant prefix hit needs: they go where the load is least."""
        if self.config.strategy == "overlap-summary":
            if req.stage == "map":
                return f"{key}#{req.index}"
            if req.stage == "ctx":
                return f"{key}#{req.index - 1}"
        return ""

    def _submit(self, state: _DocState, reqs: list[Request]) -> None:
        work: dict[str, list[WorkRequest]] = {}
        key = state.strategy.doc_key
        for req in reqs:
            state.pending += 1
            pool = state.plan[request_stage(req.stage)]
            self._requests[req.request_id] = (key, req, pool)
            # Fitted even when the result is stored, so a resumed run's row counts the same cuts.
            ids, num_cut = self.sides[pool].fitter.fit(req)
            if num_cut:
                state.num_truncated_prompts += 1
                state.num_truncated_tokens += num_cut
            stored = self.cached(req.request_id) if self.cached else None
            if stored is not None:
                self.stats.num_cached_requests += 1
                self._ready.append(stored)
                continue
            sampling = dict(max_tokens=req.max_tokens, temperature=self.config.temperature,
                            repetition_penalty=self.config.repetition_penalty,
                            penalize_prompt=self.config.penalize_prompt,
                            seed=(request_seed(self.config.seed, req.request_id)
                                  if self.config.temperature > 0 else None))
            work.setdefault(pool, []).append(WorkRequest(
                req.request_id, ids, sampling, routing_key=self._affinity(key, req), pool=pool))
        for reqs_of_pool in work.values():
            self.stats.num_requests += len(reqs_of_pool)
            self.pool.submit(reqs_of_pool)

    def _deliver(self, res: WorkResult, write: Callable[[DocResult], None]) -> None:
        entry = self._requests.pop(res.request_id, None)
        if entry is None:
            return  # its document already failed
        key, req, pool = entry
        state = self._active.get(key)
        if state is None:
            return
        state.pending -= 1
        state.last_pool = pool
        if req.stage.startswith("reduce"):
            state.merge_pools[(int(req.stage[len("reduce"):]), req.index)] = pool
        elif req.stage != "ctx":
            state.chunk_pools[req.index] = pool
            if res.expert_token_counts is not None:
                state.chunk_experts[req.index] = list(res.expert_token_counts)
            per_layer = getattr(res, "expert_token_counts_per_layer", None)
            if self.config.expert_tokens_per_layer and per_layer is not None:
                state.chunk_layer_experts[req.index] = [list(r) for r in per_layer]
        if res.error:
            self._fail(state, f"{req.stage} request for chunk {req.index}: {res.error}", write)
            return
        if self.on_result is not None:
            self.on_result(state.doc, req, res)
        state.prompt_tokens += res.num_prompt_tokens
        state.generated_tokens += res.num_generated_tokens
        state.cached_tokens += res.num_cached_tokens
        active, dense = request_flops(self.sides[pool].params, res.num_prompt_tokens,
                                      res.num_cached_tokens, res.num_generated_tokens)
        state.active_flops += active
        state.dense_flops += dense
        self.stats.prompt_tokens += res.num_prompt_tokens  # run totals move as results arrive
        self.stats.generated_tokens += res.num_generated_tokens
        self.stats.cached_tokens += res.num_cached_tokens
        if res.expert_token_counts is not None:
            if state.expert_tokens is None:
                state.expert_tokens = [0] * len(res.expert_token_counts)
            state.expert_tokens = [a + b for a, b in zip(state.expert_tokens, res.expert_token_counts)]
        try:
            nxt = state.strategy.on_output(req, res.text)
            self._submit(state, nxt)
        except Exception as exc:
            self._fail(state, f"{type(exc).__name__}: {exc}", write)
            return
        if state.strategy.done and state.pending == 0:
            self._finish(state, write)

    # -- rows -------------------------------------------------------------------------------
    def _row(self, doc: Document, pool: str = "", **kw) -> DocResult:
        """A row; model and dtypes are those of the pool that made the summary (each chunk
        and merge entry names its own), the first pool's for an error row."""
        side = self.sides.get(pool) or next(iter(self.sides.values()))
        return DocResult(doc_id=doc.doc_id, source=doc.source, model=side.model_id,
                         dtype=side.dtype, kv_cache_dtype=side.kv_cache_dtype,
                         strategy=self.config.strategy, config_fingerprint=self.fingerprint,
                         content_hash=doc.content_hash, **kw)

    def _write_error(self, doc: Document, message: str, write) -> None:
        self.stats.num_failed += 1
        self.stats.errors.append(f"{doc.doc_id}: {message}")
        write(self._row(doc, status="error", error=message))

    def _fail(self, state: _DocState, message: str, write) -> None:
        key = state.strategy.doc_key
        self._active.pop(key, None)
        orphans = [r for r, (k, _, _) in self._requests.items() if k == key]
        for rid in orphans:
            self._requests.pop(rid)
        abort = getattr(self.pool, "abort", None)
        if abort is not None and orphans:
            abort(orphans)  # the replicas stop work nobody will read
        self._release(key)
        self._write_error(state.doc, message, write)

    def _release(self, key: str) -> None:
        release = getattr(self.pool, "release", None)
        if release is not None:
            release(key)

    def _finish(self, state: _DocState, write) -> None:
        st = state.strategy
        self._active.pop(st.doc_key, None)
        self._release(st.doc_key)
        def named(pool: str | None) -> dict:
            return dict(pool=pool, model=self.sides[pool].model_id if pool else None)

        chunks = [
            dict(index=c.index, token_start=c.token_start, token_end=c.token_end,
                 char_start=c.char_start, char_end=c.char_end, output=st.chunk_outputs[c.index],
                 expert_tokens=state.chunk_experts.get(c.index),
                 expert_tokens_per_layer=state.chunk_layer_experts.get(c.index),
                 **named(state.chunk_pools.get(c.index)))
            for c in st.chunks
        ]
        merges = [
            dict(level=level + 1, index=g, sources=sources,
                 **named(state.merge_pools.get((level + 1, g))))
            for level, groups in enumerate(st.merge_provenance) for g, sources in enumerate(groups)
        ]
        self.stats.num_ok += 1
        write(self._row(
            state.doc, state.last_pool, status="ok", summary=st.summary, chunks=chunks,
            merges=merges, active_flops=state.active_flops, dense_flops=state.dense_flops,
            num_tokens=state.num_tokens, num_chunks=len(st.chunks),
            prompt_tokens=state.prompt_tokens, generated_tokens=state.generated_tokens,
            cached_tokens=state.cached_tokens, wall_s=time.perf_counter() - state.t0,
            expert_tokens=state.expert_tokens, num_truncated_prompts=state.num_truncated_prompts,
            num_truncated_tokens=state.num_truncated_tokens,
        ))

    # -- the loop ---------------------------------------------------------------------------
    def run(self, documents: Iterable[Document], write: Callable[[DocResult], None]) -> RunStats:
        t0 = time.perf_counter()
        docs = iter(documents)
        exhausted = False
        last_progress = 0.0
        while True:
            while not exhausted and (len(self._active) + len(self._chunking)
                                     < self.config.max_inflight_docs):
                doc = next(docs, None)
                if doc is None:
                    exhausted = True
                    break
                self._start(doc, write)
                self._drain_ready(write)
            if self._chunking:
                self._take_chunked(write)
                self._drain_ready(write)
            if exhausted and not self._active and not self._chunking:
                break
            if self._ready:
                self._drain_ready(write)
                continue
            # Wait for model results; briefly while chunk tasks may finish.
            for res in self.pool.results(timeout=0.05 if self._chunking else 0.5):
                self._deliver(res, write)
            self._drain_ready(write)
            now = time.perf_counter()
            if self.on_progress and now - last_progress > 0.5:
                self.stats.wall_s = now - t0
                self.on_progress(self.stats)
                last_progress = now
        self.stats.wall_s = time.perf_counter() - t0
        self.stats.num_truncated_prompts = sum(s.fitter.num_truncated for s in self.sides.values())
        if self.on_progress:
            self.on_progress(self.stats)
        return self.stats

    def _drain_ready(self, write) -> None:
        while self._ready:
            self._deliver(self._ready.popleft(), write)
