"""Request state: the one object the scheduler, block manager and runner share."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from models.engine.sampling import SamplingParams, SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """A finished request, as `LLM.generate` and `LLMEngine.step` return it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or string), "length", "abort"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_generated_tokens: int
    num_preemptions: int = 0
    expert_token_counts: list[int] | None = None  # MoE: tokens of this request per expert
    # MoE: the same per MoE layer ([L][E]; `expert_token_counts` is its sum over layers)
    expert_token_counts_per_layer: list[list[int]] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return True


class Sequence:
    """One request's tokens, block table and progress.

    Tokens [0, num_computed_tokens) have K/V in the cache. There is one block table per KV
    cache group (`block_tables[g]`; a model mixing full and sliding-window layers has two,
    see models.engine.block_manager.HybridBlockManager). `block_tables[g][i]` holds positions
    [i*block_size, (i+1)*block_size) for group g's layers; entries before
    `num_released[g]` are -1: released (or never taken, after a prefix hit) because every
    layer of the group has moved past them. `block_table` and `num_released_blocks` name
    group 0's, the only group of a model whose layers all have the same window.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "params", "sampling",
        "status", "block_tables", "num_released", "num_computed_tokens",
        "num_cached_tokens", "num_preemptions", "block_hashes", "metrics", "expert_counts",
        "finish_reason", "stop_reason", "output_text", "stop_check_offset",
    )

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None, num_kv_groups: int = 1) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.sampling = SamplingState(params, self.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_tables: list[list[int]] = [[] for _ in range(num_kv_groups)]
        self.num_released: list[int] = [0] * num_kv_groups
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []  # chain hashes (sha256 digests) of the full blocks, in order
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.perf_counter())
        self.expert_counts = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.output_text = ""
        self.stop_check_offset = 0

    @property
    def block_table(self) -> list[int]:
        return self.block_tables[0]

    @block_table.setter
    def block_table(self, table: list[int]) -> None:
        self.block_tables[0] = table

    @property
    def num_released_blocks(self) -> int:
        return self.num_released[0]

    @num_released_blocks.setter
    def num_released_blocks(self, n: int) -> None:
        self.num_released[0] = n

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.sampling.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
