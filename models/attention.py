"""Grouped-query attention over a flat batch of tokens, reading and writing a paged KV cache.

The batch is the concatenation of the new tokens of many sequences (prefill chunks and single
decode tokens mixed). Each sequence's context is described by a `SeqSpan`:

    positions  0 ........ kv_start ............ context_len - num_new ...... context_len
               | evicted  |  readable K/V (kv_slots)  |   new tokens (this step)    |
                (window)                              '-- written by this step --'

K/V of the new tokens are written to the cache through `slot_mapping` first, so every query reads
all of its keys from the cache. Cache layout per layer: `[num_kv_heads, num_slots, head_dim]`;
slot = block_id * block_size + offset. A sequence's slots come as runs of consecutive slots:
each run is read in place (a view, no copy). A decode query over several runs attends to each
run and merges the partial results by their log-sum-exp (CPU); prefill over several runs
concatenates them first.

Without a cache (`kv_cache=None`, used by tests and one-shot scoring) each sequence attends to
its own tokens in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import Linear, apply_rotary


@dataclass(slots=True)
class SeqSpan:
    q_start: int  # first row of this sequence in the flat batch
    q_end: int
    context_len: int  # number of positions after this step (cached + new)
    kv_start: int = 0  # first position whose K/V is still held (> 0 after window eviction)
    # Cache slots of positions [kv_start, context_len), as runs of consecutive slots;
    # None: no cache (the sequence attends to its own tokens in the batch).
    kv_slots: list[slice] | None = None

    @property
    def num_new(self) -> int:
        return self.q_end - self.q_start


@dataclass(slots=True)
class AttentionMetadata:
    spans: list[SeqSpan]
    slot_mapping: torch.Tensor | None = None  # [N] cache slot of each new token
    # (span index, window) -> (first key offset to read, mask or None); shared by all layers.
    _plans: dict[tuple[int, int | None], tuple[int, torch.Tensor | None]] = field(
        default_factory=dict
    )

    @classmethod
    def for_dense(cls, seq_lens: list[int]) -> AttentionMetadata:
        """Metadata for independent sequences with no cache (each attends to itself)."""
        spans, start = [], 0
        for n in seq_lens:
            spans.append(SeqSpan(start, start + n, context_len=n))
            start += n
        return cls(spans)

    def plan(self, i: int, window: int | None, device: torch.device) -> tuple[int, torch.Tensor | None]:
        """Which keys span i reads under `window`, and the boolean mask if one is needed."""
        key = (i, window)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        span = self.spans[i]
        num_new, ctx = span.num_new, span.context_len
        first_q = ctx - num_new
        # Keys older than the first query's window are never read by any query of this span.
        first_k = span.kv_start if window is None else max(span.kv_start, first_q - window + 1)
        assert first_k >= span.kv_start, "window reaches evicted keys: evicted too early?"
        offset = first_k - span.kv_start
        mask = None
        needs_causal = num_new > 1
        needs_window = window is not None and ctx - first_k > window
        if needs_causal or needs_window:
            q_pos = torch.arange(first_q, ctx, device=device).unsqueeze(1)
            k_pos = torch.arange(first_k, ctx, device=device).unsqueeze(0)
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= q_pos - k_pos < window
            # Plain causal over a fresh sequence: let SDPA use its causal kernel instead.
            mask = None if (first_k == first_q and not needs_window) else allowed
        self._plans[key] = (offset, mask)
        return offset, mask


def _drop_front(runs: list[slice], n: int) -> list[slice]:
    """The runs without their first n slots."""
    if n == 0:
        return runs
    out = []
    for r in runs:
        size = r.stop - r.start
        if n >= size:
            n -= size
            continue
        out.append(slice(r.start + n, r.stop))
        n = 0
    return out


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.layer_window(layer_id)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        N = x.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k sit side by side in the fused projection: rotate them in one pass.
        qk = apply_rotary(qkv[:, : (H + Hkv) * D].view(N, H + Hkv, D), cos, sin)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + Hkv) * D :].view(N, Hkv, D)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache[:, meta.slot_mapping] = k.transpose(0, 1)
            v_cache[:, meta.slot_mapping] = v.transpose(0, 1)
        out = torch.empty_like(q)
        for i, span in enumerate(meta.spans):
            offset, mask = meta.plan(i, self.window, x.device)
            qi = q[span.q_start : span.q_end]
            if kv_cache is None:
                keys = k[span.q_start : span.q_end].transpose(0, 1)[:, offset:]  # [Hkv, T, D]
                values = v[span.q_start : span.q_end].transpose(0, 1)[:, offset:]
                o = self._attend(qi, keys, values, mask)
            else:
                runs = _drop_front(span.kv_slots, offset)
                if len(runs) == 1:
                    o = self._attend(qi, k_cache[:, runs[0]], v_cache[:, runs[0]], mask)
                elif span.num_new == 1 and k_cache.device.type == "cpu":
                    o = self._attend_runs(qi, k_cache, v_cache, runs)
                else:
                    keys = torch.cat([k_cache[:, r] for r in runs], dim=1)
                    values = torch.cat([v_cache[:, r] for r in runs], dim=1)
                    o = self._attend(qi, keys, values, mask)
            out[span.q_start : span.q_end] = o
        return self.o_proj(out.view(N, H * D))

    def _attend_runs(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     runs: list[slice]) -> torch.Tensor:
        """One decode query over K/V in several runs: attend to each run in place, then merge
        by log-sum-exp: out = sum_r exp(lse_r - lse) * out_r."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qg = q.view(1, Hkv, H // Hkv, D)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        outs, lses = [], []
        for r in runs:
            o, lse = flash(qg, k_cache[:, r].unsqueeze(0), v_cache[:, r].unsqueeze(0))
            outs.append(o.float())
            lses.append(lse)
        lse = torch.stack(lses)  # [R, 1, Hkv, G]
        weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).unsqueeze(-1)
        merged = (torch.stack(outs) * weights).sum(0)
        return merged.to(q.dtype).view(1, H, D)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q: [Tq, H, D]; keys/values: [Hkv, Tk, D] -> [Tq, H, D]."""
        Tq = q.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if Tq == 1:
            # Decode: fold the query heads that share a KV head into the "length" axis, so no
            # K/V expansion is needed and one call covers all heads.
            qg = q.view(1, Hkv, H // Hkv, D)
            o = F.scaled_dot_product_attention(qg, keys.unsqueeze(0), values.unsqueeze(0))
            return o.view(1, H, D)
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
        o = F.scaled_dot_product_attention(
            qh,
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=H != Hkv,
        )
        return o[0].transpose(0, 1)
