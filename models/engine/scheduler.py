"""Continuous batching: which sequences run this step, and how many tokens each computes.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, in
admission order: a decoding sequence takes 1 token, a sequence in chunked prefill takes the
rest of its prompt up to the budget. Then waiting sequences are admitted (prefix cache first)
while the budget, `max_num_seqs` and the block pool allow. Prefill chunks and decodes share
one batch.

When a running sequence needs a block and none is free, the most recently admitted running
sequence is preempted by recompute: its blocks are freed (they stay in the prefix cache), its
generated tokens are kept, and it goes back to the front of the waiting queue. That costs time,
never correctness: the recomputed K/V equal the dropped ones.

With `align` (batch-invariant engines) a prompt piece ends only at a multiple of `align` or at
the prompt's end, the boundaries of the attention's query groups (see models.attention): a
piece that cannot reach one within the step's budget waits for the next step. So the pieces,
and every row's attention call, are the same whatever else shares the step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from models.engine.block_manager import BlockManager
from models.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, align: int | None = None) -> None:
        self.block_manager = block_manager
        self.align = align
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _piece(self, seq: Sequence, start: int, budget: int) -> int:
        """How many tokens `seq` computes this step from position `start` (0: none now)."""
        n = min(seq.num_tokens - start, budget)
        if self.align is None or start + n >= seq.num_prompt_tokens:
            return n
        return max(0, (start + n) // self.align * self.align - start)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            assert seq.num_tokens > seq.num_computed_tokens, "running sequence with nothing to compute"
            num_new = self._piece(seq, seq.num_computed_tokens, budget)
            if num_new == 0:  # its next piece does not fit the budget left: next step
                i += 1
                continue
            while not bm.allocate(seq, num_new):
                victim = self.running.pop()  # most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:  # preempted itself
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                # While others run, admit only what can finish without preempting them:
                # preemption recomputes a prompt, admission control costs nothing.
                num_new = bm.admit(seq, budget, self._piece, whole_lifetime=bool(self.running))
                if num_new == 0:
                    break
                if num_new is None:
                    if not self.running and not batch.seqs:
                        raise RuntimeError(
                            f"request {seq.request_id} needs more KV-cache blocks than the pool "
                            f"has ({bm.num_blocks} blocks of {bm.block_size} tokens): raise "
                            "kv_cache_memory_bytes or shorten the prompt"
                        )
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                if seq.metrics.first_scheduled_time is None:
                    seq.metrics.first_scheduled_time = time.perf_counter()
                self.running.append(seq)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens + n >= seq.num_tokens and n == 1 and seq.output_token_ids:
                batch.num_decode_tokens += 1
            else:
                batch.num_prefill_tokens += n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
