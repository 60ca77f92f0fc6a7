"""Turns a scheduled batch into tensors, runs the model, and returns the logits to sample.

Owns the KV cache tensors, one per KV cache group (the layers that share a window; see
`kv_cache_groups`): per layer of group g, K and V of shape [num_kv_heads, num_blocks[g] *
block_size, head_dim] (slot = block_id * block_size + offset in that group's pool).
Head-major keeps each head's keys for a run of consecutive blocks contiguous, so a sequence
with a consecutive block table is read in place. An MLA model (deepseek_v3, `models.mla`)
keeps one latent entry per token and layer instead: [1, num_blocks * block_size,
kv_lora_rank + qk_rope_head_dim], with a zero-size V (`ModelConfig.kv_cache_entry`). Each
group has its own slot mapping and spans per step (`AttentionMetadata.by_window`); a model
with one group has one of each, as before groups existed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from models.attention import AttentionMetadata, SeqSpan
from models.config import ModelConfig
from models.cpu import keep_freed_memory
from models.engine.scheduler import ScheduledBatch
from models.moe import RouteStats
from models.transformer import TransformerLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVCacheGroup:
    """Layers that share a window, hence block tables (vLLM's KV cache group)."""

    window: int | None  # None: full attention
    layer_ids: tuple[int, ...]


def kv_cache_groups(config: ModelConfig) -> list[KVCacheGroup]:
    """One group per distinct layer window, full attention first (group 0)."""
    windows = config.layer_windows
    keys = sorted(set(windows), key=lambda w: -1 if w is None else w)
    return [KVCacheGroup(w, tuple(i for i, lw in enumerate(windows) if lw == w)) for w in keys]


def kv_bytes_per_token(model: TransformerLM, kv_dtype: torch.dtype | None = None,
                       num_layers: int | None = None) -> int:
    """K and V bytes of one token over all layers (or `num_layers` of them), in `kv_dtype`
    (default: the model's); for MLA the latent entry's bytes."""
    c = model.config
    elem = torch.finfo(kv_dtype or model.dtype).bits // 8
    layers = c.num_hidden_layers if num_layers is None else num_layers
    num_tensors, num_heads, dim = c.kv_cache_entry
    return num_tensors * layers * num_heads * dim * elem


class ModelRunner:
    def __init__(self, model: TransformerLM, num_blocks: int | list[int], block_size: int,
                 align: int | None = None, kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        if model.device.type == "cpu":
            keep_freed_memory()  # activations reused, not page-faulted in each layer
        self.block_size = block_size
        self.align = align  # batch-invariant query groups (see models.attention)
        c = model.config
        self.groups = kv_cache_groups(c)
        if isinstance(num_blocks, int):
            num_blocks = [num_blocks] * len(self.groups)
        assert len(num_blocks) == len(self.groups), "one block count per KV cache group"
        self.num_blocks = num_blocks if len(num_blocks) > 1 else num_blocks[0]
        self.group_kv_caches: list[torch.Tensor] = []
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [None] * c.num_hidden_layers
        num_tensors, num_heads, dim = c.kv_cache_entry
        for group, n in zip(self.groups, num_blocks):
            shape = (len(group.layer_ids), num_tensors, num_heads, n * block_size, dim)
            # Not zeroed: a slot is always written before it is read, and untouched pages of
            # a large CPU allocation cost no memory.
            t = torch.empty(shape, dtype=kv_dtype or model.dtype, device=model.device)
            self.group_kv_caches.append(t)
            for j, layer_id in enumerate(group.layer_ids):
                # MLA: no V (the latent is both); a zero-size view keeps the (K, V) pair shape
                v = t[j, 1] if num_tensors == 2 else t[j, 0, :, :, :0]
                self.kv_caches[layer_id] = (t[j, 0], v)
            logger.info(
                "KV cache%s: %d blocks x %d tokens = %d tokens, %d layers, %s, %.1f MiB",
                "" if len(self.groups) == 1 else f" (window {group.window})", n, block_size,
                n * block_size, len(group.layer_ids), t.dtype, t.numel() * t.element_size() / 2**20,
            )
        self.kv_cache = self.group_kv_caches[0]
        self.is_moe = c.is_moe

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
        # per group: the slots of the new tokens and the spans
        slot_mapping: list[list[torch.Tensor]] = [[] for _ in self.groups]
        spans: list[list[SeqSpan]] = [[] for _ in self.groups]
        sample_rows: list[int] = []
        sample_idx: list[int] = []
        row = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids(start, end))
            pos = torch.arange(start, end)
            positions.append(pos)
            for g in range(len(self.groups)):
                block_table = seq.block_tables[g]
                table = torch.tensor(block_table[start // bs : -(-end // bs)], dtype=torch.long)
                slot_mapping[g].append(table[(pos // bs) - start // bs] * bs + pos % bs)
                kv_start = seq.num_released[g] * bs
                spans[g].append(SeqSpan(row, row + n, end, kv_start,
                                        self._kv_runs(block_table, seq.num_released[g], end - kv_start),
                                        seq.num_prompt_tokens))
            row += n
            if end == seq.num_tokens:
                sample_rows.append(row - 1)
                sample_idx.append(i)
        metas = [AttentionMetadata(sp, torch.cat(sm).to(device), self.align)
                 for sp, sm in zip(spans, slot_mapping)]
        meta = metas[0]
        if len(metas) > 1:
            meta.by_window = {group.window: m for group, m in zip(self.groups, metas)}
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.cat(positions).to(device)
        route_stats = None
        if self.is_moe:
            token_seq = torch.repeat_interleave(torch.arange(len(batch.seqs)),
                                                torch.tensor(batch.num_new_tokens))
            num_experts = self.model.config.num_local_experts
            route_stats = RouteStats(token_seq.to(device), torch.zeros(
                len(batch.seqs), self.model.num_moe_layers, num_experts, dtype=torch.long,
                device=device))
        hidden = self.model(ids, pos, meta, self.kv_caches, route_stats)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=device)
        logits = self.model.compute_logits(hidden[rows], fixed_k=meta.batch_invariant)
        return logits, sample_idx, None if route_stats is None else route_stats.counts.cpu()
