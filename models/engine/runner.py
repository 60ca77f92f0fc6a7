"""Turns a scheduled batch into tensors, runs the model, and returns the logits to sample.

Owns the KV cache tensors: per layer, K and V of shape [num_kv_heads, num_blocks * block_size,
head_dim] (slot = block_id * block_size + offset). Head-major keeps each head's keys for a run
of consecutive blocks contiguous, so a sequence with a consecutive block table is read in
place.
"""

from __future__ import annotations

import logging

import torch

from models.attention import AttentionMetadata, SeqSpan
from models.engine.scheduler import ScheduledBatch
from models.moe import RouteStats
from models.transformer import TransformerLM

logger = logging.getLogger(__name__)


def kv_bytes_per_token(model: TransformerLM, kv_dtype: torch.dtype | None = None) -> int:
    """K and V bytes of one token over all layers, in `kv_dtype` (default: the model's)."""
    c = model.config
    elem = torch.finfo(kv_dtype or model.dtype).bits // 8
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem


class ModelRunner:
    def __init__(self, model: TransformerLM, num_blocks: int, block_size: int,
                 align: int | None = None, kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.align = align  # batch-invariant query groups (see models.attention)
        self.num_blocks = num_blocks
        c = model.config
        num_slots = num_blocks * block_size
        shape = (c.num_hidden_layers, 2, c.num_key_value_heads, num_slots, c.head_dim)
        # Not zeroed: a slot is always written before it is read, and untouched pages of a
        # large CPU allocation cost no memory.
        self.kv_cache = torch.empty(shape, dtype=kv_dtype or model.dtype, device=model.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(shape[0])]
        self.is_moe = c.is_moe
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %s, %.1f MiB",
            num_blocks, block_size, num_slots, self.kv_cache.dtype, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20,
        )

    def _kv_runs(self, table: list[int], first_block: int, num_tokens: int) -> list[slice]:
        """Slots of `num_tokens` positions from block `first_block` of `table`, as runs of
        consecutive slots (one run when the blocks are consecutive)."""
        bs = self.block_size
        blocks = table[first_block : first_block + -(-num_tokens // bs)]
        runs: list[slice] = []
        run_start = prev = blocks[0]
        for b in blocks[1:]:
            if b != prev + 1:
                runs.append(slice(run_start * bs, (prev + 1) * bs))
                run_start = b
            prev = b
        runs.append(slice(run_start * bs, (prev + 1) * bs))
        # the last block may be partly filled
        excess = len(blocks) * bs - num_tokens
        last = runs[-1]
        runs[-1] = slice(last.start, last.stop - excess)
        return runs

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """Run one step. Returns (logits [S, V] fp32 for the S sequences that reach the end of
        their known tokens, their indices in the batch, per-sequence expert counts or None)."""
        bs = self.block_size
        device = self.model.device
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        spans: list[SeqSpan] = []
        sample_rows: list[int] = []
        sample_idx: list[int] = []
        row = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids(start, end))
            pos = torch.arange(start, end)
            positions.append(pos)
            table = torch.tensor(seq.block_table[start // bs : -(-end // bs)], dtype=torch.long)
            slot_mapping.append(table[(pos // bs) - start // bs] * bs + pos % bs)
            kv_start = seq.num_released_blocks * bs
            spans.append(SeqSpan(row, row + n, end, kv_start,
                                 self._kv_runs(seq.block_table, seq.num_released_blocks, end - kv_start),
                                 seq.num_prompt_tokens))
            row += n
            if end == seq.num_tokens:
                sample_rows.append(row - 1)
                sample_idx.append(i)
        meta = AttentionMetadata(spans, torch.cat(slot_mapping).to(device), self.align)
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.cat(positions).to(device)
        route_stats = None
        if self.is_moe:
            token_seq = torch.repeat_interleave(torch.arange(len(batch.seqs)),
                                                torch.tensor(batch.num_new_tokens))
            num_experts = self.model.config.num_local_experts
            route_stats = RouteStats(token_seq.to(device),
                                     torch.zeros(len(batch.seqs), num_experts, dtype=torch.long, device=device))
        hidden = self.model(ids, pos, meta, self.kv_caches, route_stats)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=device)
        logits = self.model.compute_logits(hidden[rows], fixed_k=meta.batch_invariant)
        return logits, sample_idx, None if route_stats is None else route_stats.counts.cpu()
