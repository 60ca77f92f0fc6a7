"""The step loop: request intake, scheduling, one forward per step, sampling, stopping.

The interface the Ray workers drive (and an optional vLLM backend mirrors):
`add_request(request_id, prompt_token_ids, sampling_params)`, `step() -> finished outputs`,
`abort(request_id)`, `has_unfinished()`, `stats()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from models.dtypes import KV_CHOICES, dtype_name, resolve_kv_cache_dtype
from models.engine.block_manager import BlockManager, HybridBlockManager
from models.engine.runner import KVCacheGroup, ModelRunner, kv_bytes_per_token, kv_cache_groups
from models.engine.sampling import Sampler, SamplingParams, find_stop_string
from models.engine.scheduler import Scheduler
from models.engine.sequence import RequestOutput, Sequence
from models.transformer import TransformerLM

logger = logging.getLogger(__name__)


# Batch-invariant prefill pieces end at multiples of this many tokens; it shapes the outputs,
# so the pipeline never changes it (pipeline.settings.min_batched_tokens checks the budget).
PREFILL_ALIGN_TOKENS = 512


@dataclass(slots=True)
class EngineConfig:
    """Engine settings, named as in vLLM where the concept matches."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # None: 2 GiB on CPU, 60% of free memory on CUDA
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # Take a request's generation blocks at admission so its block table is one consecutive
    # run (attention reads K/V in place); costs memory held for outputs that stop early.
    reserve_decode_blocks: bool = True
    # Batch invariance: a request's output does not depend on what else is in flight (greedy
    # results of a resumed job equal an uninterrupted run's). Prefill pieces end at multiples
    # of `prefill_align_tokens` (or the prompt's end) and prefix-cache hits count in whole
    # multiples of it; see models.attention. False: pieces cut anywhere, hits per block.
    batch_invariant: bool = False
    prefill_align_tokens: int = PREFILL_ALIGN_TOKENS
    # "auto" (the compute dtype), "float32" or "bfloat16" (with fp32 compute: half the KV
    # bytes); see models.dtypes.resolve_kv_cache_dtype.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= block_size"
            )
        if self.prefill_align_tokens <= 0:
            raise ValueError(f"prefill_align_tokens={self.prefill_align_tokens} must be positive")
        if self.kv_cache_dtype not in KV_CHOICES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of "
                             f"{', '.join(KV_CHOICES)}")

    @property
    def align(self) -> int | None:
        """The prefill alignment in effect: `prefill_align_tokens`, lowered (to whole blocks)
        so that a piece always fits the budget that decodes leave; None if not invariant."""
        if not self.batch_invariant:
            return None
        room = min(self.prefill_align_tokens, self.max_num_batched_tokens - self.max_num_seqs + 1)
        align = room // self.block_size * self.block_size
        return align if align > 0 else None


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    return 2 << 30


def split_kv_blocks(budget: int, groups: list[KVCacheGroup], group_bytes_per_token: list[int],
                    block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Blocks per KV cache group from a budget in bytes. A sliding group (window W) never needs
    more than about W / block_size + 3 blocks per running sequence plus the step's new tokens
    (its blocks behind the window are released), so it gets that many, or as many as a full
    group would have if the budget were split evenly if that is fewer; full-attention groups
    share the rest. So a hybrid pool holds at least the tokens an all-full pool would."""
    bs = block_size
    even = max(1, budget // (sum(group_bytes_per_token) * bs))
    if all(g.window is None for g in groups) or all(g.window is not None for g in groups):
        return [even] * len(groups)
    num_blocks = []
    for g in groups:
        if g.window is None:
            num_blocks.append(None)
            continue
        bound = max_num_seqs * (-(-(g.window - 1) // bs) + 3) + -(-max_num_batched_tokens // bs)
        num_blocks.append(min(even, bound))
    rest = budget - sum(n * bs * b for n, b in zip(num_blocks, group_bytes_per_token) if n is not None)
    full_bytes = sum(b for n, b in zip(num_blocks, group_bytes_per_token) if n is None) * bs
    return [max(1, rest // full_bytes) if n is None else n for n in num_blocks]


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    prefill_time_s: float = 0.0  # steps that computed any prefill tokens
    decode_time_s: float = 0.0  # decode-only steps
    num_finished: int = 0


class LLMEngine:
    def __init__(self, model: TransformerLM, tokenizer=None, config: EngineConfig | None = None,
                 eos_token_ids: frozenset[int] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        mc = model.config
        self.max_model_len = self.config.max_model_len or mc.max_position_embeddings
        budget = self.config.kv_cache_memory_bytes or default_kv_cache_bytes(model.device)
        bs = self.config.block_size
        self.kv_dtype = resolve_kv_cache_dtype(self.config.kv_cache_dtype, model.dtype, model.device)
        self.kv_groups = kv_cache_groups(mc)
        extra_key = f"{mc.name}|{mc.model_type}|{mc.vocab_size}|{model.dtype}|{self.kv_dtype}"
        if len(self.kv_groups) == 1:
            num_blocks = max(1, budget // (kv_bytes_per_token(model, self.kv_dtype) * bs))
            # One block table for all layers: blocks are released when every layer slides.
            self.block_manager = BlockManager(
                num_blocks, bs, self.config.enable_prefix_caching, extra_key=extra_key,
                release_window=self.kv_groups[0].window,
                reserve_decode=self.config.reserve_decode_blocks,
                hit_align=self.config.align,
            )
        else:
            # Full and sliding layers: a block pool and block table per group (hybrid).
            windows = [g.window for g in self.kv_groups]
            num_blocks = split_kv_blocks(
                budget, self.kv_groups,
                [kv_bytes_per_token(model, self.kv_dtype, len(g.layer_ids)) for g in self.kv_groups],
                bs, self.config.max_num_seqs, self.config.max_num_batched_tokens)
            self.block_manager = HybridBlockManager(
                num_blocks, bs, windows, self.config.enable_prefix_caching, extra_key=extra_key,
                reserve_decode=self.config.reserve_decode_blocks, hit_align=self.config.align,
            )
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens, self.config.align)
        self.runner = ModelRunner(model, num_blocks, bs, self.config.align, self.kv_dtype)
        self.sampler = Sampler()
        if eos_token_ids is None:
            eos_token_ids = getattr(tokenizer, "stop_token_ids", None) or mc.eos_token_ids
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self.stats_ = EngineStats()
        # MoE: tokens per (MoE layer, expert), for the engine and for each request
        self.expert_totals = torch.zeros(model.num_moe_layers, mc.num_local_experts,
                                         dtype=torch.long) if mc.is_moe else None

    # -- intake -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams | None = None) -> None:
        params = sampling_params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if n >= self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt has {n} tokens, the model's context is "
                f"{self.max_model_len}; shorten the prompt (smaller chunks)"
            )
        bm = self.block_manager
        if not bm.fits(n):
            full = bm if isinstance(bm, BlockManager) else next(
                g for g in bm.groups if g.release_window is None)
            raise ValueError(
                f"request {request_id!r}: prompt of {n} tokens exceeds the KV cache "
                f"({full.num_blocks * full.block_size} tokens); raise kv_cache_memory_bytes"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"request {request_id!r}: token ids must be in [0, {vocab})")
        seq = Sequence(request_id, prompt_token_ids, params, num_kv_groups=len(self.kv_groups))
        if self.expert_totals is not None:
            seq.expert_counts = torch.zeros_like(self.expert_totals)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        t0 = time.perf_counter()
        logits, sample_idx, expert_counts = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
        if expert_counts is not None:
            self.expert_totals += expert_counts.sum(0)
            for i, seq in enumerate(batch.seqs):
                seq.expert_counts += expert_counts[i]
        finished = []
        if sample_idx:
            seqs = [batch.seqs[i] for i in sample_idx]
            token_ids = self.sampler(logits, [s.sampling for s in seqs], self.eos_token_ids)
            now = time.perf_counter()
            for seq, token_id in zip(seqs, token_ids):
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
                seq.append_token(token_id)
                if self._check_stop(seq, token_id):
                    self.scheduler.finish(seq)
                    del self.requests[seq.request_id]
                    seq.metrics.finished_time = now
                    finished.append(self._output(seq))
        dt = time.perf_counter() - t0
        s = self.stats_
        s.num_steps += 1
        s.num_prefill_tokens += batch.num_prefill_tokens
        s.num_decode_tokens += batch.num_decode_tokens
        if batch.num_prefill_tokens:
            s.prefill_time_s += dt
        else:
            s.decode_time_s += dt
        s.num_finished += len(finished)
        return finished

    def _check_stop(self, seq: Sequence, token_id: int) -> bool:
        p = seq.params
        num_out = len(seq.output_token_ids)
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token_id in self.eos_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
                return True
            if token_id in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token_id
                return True
            if p.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
                hit = find_stop_string(text, p.stop, seq.stop_check_offset)
                seq.stop_check_offset = len(text)
                if hit is not None:
                    index, stop_str = hit
                    seq.output_text = text[: index + (len(stop_str) if p.include_stop_str_in_output else 0)]
                    seq.finish_reason, seq.stop_reason = "stop", stop_str
                    return True
        if p.max_tokens is not None and num_out >= p.max_tokens:
            seq.finish_reason = "length"
            return True
        if seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _output(self, seq: Sequence) -> RequestOutput:
        p = seq.params
        token_ids = list(seq.output_token_ids)
        if seq.finish_reason == "stop" and seq.stop_reason is None and not p.ignore_eos:
            token_ids_for_text = token_ids[:-1] if token_ids and token_ids[-1] in self.eos_token_ids else token_ids
        elif isinstance(seq.stop_reason, int) and not p.include_stop_str_in_output:
            token_ids_for_text = token_ids[:-1]
        else:
            token_ids_for_text = token_ids
        if isinstance(seq.stop_reason, str):
            text = seq.output_text
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids_for_text, p.skip_special_tokens)
        else:
            text = ""
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=token_ids,
            text=text,
            finish_reason=seq.finish_reason or "abort",
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_generated_tokens=len(token_ids),
            num_preemptions=seq.num_preemptions,
            expert_token_counts=None if seq.expert_counts is None else seq.expert_counts.sum(0).tolist(),
            expert_token_counts_per_layer=None if seq.expert_counts is None else seq.expert_counts.tolist(),
            metrics=seq.metrics,
            stop_reason=seq.stop_reason,
        )

    def stats(self) -> dict:
        bm = self.block_manager
        s = self.stats_
        out = asdict(s)
        out.update(
            num_blocks=bm.num_blocks,
            block_size=bm.block_size,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            kv_cache_group_blocks=[g.num_blocks for g in getattr(bm, "groups", [bm])],
            prefix_cache_queries=bm.num_queries,
            prefix_cache_hits=bm.num_hits,
            prefix_cache_hit_rate=bm.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            dtype=dtype_name(self.model.dtype),
            kv_cache_dtype=dtype_name(self.kv_dtype),
            kv_bytes_per_token=kv_bytes_per_token(self.model, self.kv_dtype),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            prefill_tok_per_s=s.num_prefill_tokens / s.prefill_time_s if s.prefill_time_s else 0.0,
            decode_tok_per_s=s.num_decode_tokens / s.decode_time_s if s.decode_time_s else 0.0,
        )
        if self.expert_totals is not None:
            out["expert_token_counts"] = self.expert_totals.sum(0).tolist()
            out["expert_token_counts_per_layer"] = self.expert_totals.tolist()
        return out
