"""Grouped-query attention over a flat batch of tokens, reading and writing a paged KV cache.

The batch is the concatenation of the new tokens of many sequences (prefill chunks and single
decode tokens mixed). Each sequence's context is described by a `SeqSpan`:

    positions  0 ........ kv_start ............ context_len - num_new ...... context_len
               | evicted  |  readable K/V (kv_slots)  |   new tokens (this step)    |
                (window)                              '-- written by this step --'

K/V of the new tokens are written to the cache through `slot_mapping` first, so every query reads
all of its keys from the cache. Cache layout per layer: `[num_kv_heads, num_slots, head_dim]`;
slot = block_id * block_size + offset (in the pool of the layer's KV cache group: a model
mixing full and sliding-window layers gives each kind its own block tables, slot mapping and
spans, `AttentionMetadata.by_window`). A sequence's slots come as runs of consecutive slots:
each run is read in place (a view, no copy). A decode query over several runs attends to each
run and merges the partial results by their log-sum-exp (CPU); prefill over several runs
concatenates them first.

Batch invariance (`AttentionMetadata.align`): the CPU flash-attention kernel's rounding for a
query row depends on how many keys the call holds, so the same prompt prefilled in different
pieces (as other requests share the step's token budget) can give K/V that differ in the last
bit, and greedy decoding can then flip a near-tie token. With `align = A` a span's queries are
split into groups that do not depend on the batch: prompt positions in groups
[jA, min((j+1)A, prompt_len)), each attending to keys up to its own end, and positions past the
prompt (recomputed after a preemption) one by one, exactly as decode computes them. The
scheduler cuts prefill pieces only at those group ends, so every row is computed by the same
call whatever else ran in the step; a decode over several runs gathers them instead of merging
by log-sum-exp. `align=None` gives one call per span.

Without a cache (`kv_cache=None`, used by tests and one-shot scoring) each sequence attends to
its own tokens in the batch.

Scores are q.k times `config.attention_scale` (head_dim**-0.5, or gemma3's
query_pre_attn_scalar**-0.5) on every path: the scale is passed to SDPA, to the CPU flash
kernel and to the native decode and prefill kernels, which take it as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models import native
from models.config import ModelConfig
from models.layers import Linear, RMSNorm, apply_rotary


@dataclass(slots=True)
class SeqSpan:
    q_start: int  # first row of this sequence in the flat batch
    q_end: int
    context_len: int  # number of positions after this step (cached + new)
    kv_start: int = 0  # first position whose K/V is still held (> 0 after window eviction)
    # Cache slots of positions [kv_start, context_len), as runs of consecutive slots;
    # None: no cache (the sequence attends to its own tokens in the batch).
    kv_slots: list[slice] | None = None
    prompt_len: int | None = None  # for batch-invariant grouping (see AttentionMetadata.align)

    @property
    def num_new(self) -> int:
        return self.q_end - self.q_start


@dataclass(slots=True)
class QueryGroup:
    """Rows [q0, q1) of a span (relative to its first new row) attend to the keys at positions
    [k0, k1) (relative to the span's kv_start).

    How: `mask` ([q1-q0, k1-k0] bool) when given; else `split`: the keys before the group's
    first query are seen by every row (one unmasked call, query heads folded onto their KV
    head) and the last q1-q0 keys causally (one causal call), merged by log-sum-exp; else
    plain causal (a fresh group) or no mask (a single query)."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: torch.Tensor | None
    split: bool = False


@dataclass(slots=True)
class NativePlan:
    """The groups of a step under one window that the native kernels compute, as index
    tables in the kernels' argument order. `decode` = (rows, run_off, run_start, run_len):
    row `rows[i]` of the batch attends to the slots `run_start[j] .. + run_len[j]` for j in
    `run_off[i] .. run_off[i+1]`, in order. `prefill` (causal groups) = (row0, nq, nk,
    run_off, run_start, run_len): rows `row0[g] ..` (`nq[g]` of them) are the last of `nk[g]`
    keys in the runs of group g. `rest` holds every other group, per span."""

    decode: tuple[torch.Tensor, ...]
    prefill: tuple[torch.Tensor, ...]
    rest: list[tuple[SeqSpan, list[QueryGroup]]]


@dataclass(slots=True)
class AttentionMetadata:
    spans: list[SeqSpan]
    slot_mapping: torch.Tensor | None = None  # [N] cache slot of each new token
    align: int | None = None  # batch-invariant query groups of this many prompt positions
    # A model whose layers differ in window has one block table per KV cache group (the
    # layers that share a window): each group's spans and slot mapping, by window; a layer
    # reads its own (see `for_layer`). None: every layer reads these.
    by_window: dict[int | None, AttentionMetadata] | None = None
    # (span index, window) -> query groups; shared by all layers.
    _plans: dict[tuple[int, int | None], list[QueryGroup]] = field(default_factory=dict)
    _native: dict[tuple[int | None, bool], NativePlan] = field(default_factory=dict)

    @property
    def batch_invariant(self) -> bool:
        return self.align is not None

    def for_layer(self, window: int | None) -> AttentionMetadata:
        """The metadata of the KV cache group of a layer with this window."""
        return self if self.by_window is None else self.by_window[window]

    @classmethod
    def for_dense(cls, seq_lens: list[int]) -> AttentionMetadata:
        """Metadata for independent sequences with no cache (each attends to itself)."""
        spans, start = [], 0
        for n in seq_lens:
            spans.append(SeqSpan(start, start + n, context_len=n))
            start += n
        return cls(spans)

    def plan(self, i: int, window: int | None, device: torch.device) -> list[QueryGroup]:
        """The query groups of span i under `window`, with the keys each reads."""
        key = (i, window)
        cached = self._plans.get(key)
        if cached is None:
            span = self.spans[i]
            first_q = span.context_len - span.num_new
            cached = [self._group(span, first_q, lo, hi, window, device)
                      for lo, hi in self._cuts(span, first_q)]
            self._plans[key] = cached
        return cached

    def native_plan(self, window: int | None, device: torch.device, prefill: bool) -> NativePlan:
        """All single-query groups of the step (decodes, and rows recomputed one by one) and,
        with `prefill`, all causal groups (no explicit mask), with their key slots, for one
        kernel call each per layer; cached per (window, prefill)."""
        cached = self._native.get((window, prefill))
        if cached is not None:
            return cached
        rows, row0, nq, nk = [], [], [], []
        dec_runs, pre_runs = ([0], [], []), ([0], [], [])  # (run_off, run_start, run_len)
        rest = []
        for i, span in enumerate(self.spans):
            others = []
            for g in self.plan(i, window, device):
                if span.kv_slots is None or g.mask is not None or (g.q1 - g.q0 > 1 and not prefill):
                    others.append(g)
                    continue
                if g.q1 - g.q0 == 1:
                    rows.append(span.q_start + g.q0)
                    off, starts, lens = dec_runs
                else:
                    row0.append(span.q_start + g.q0)
                    nq.append(g.q1 - g.q0)
                    nk.append(g.k1 - g.k0)
                    off, starts, lens = pre_runs
                for r in _select(span.kv_slots, g.k0, g.k1):
                    starts.append(r.start)
                    lens.append(r.stop - r.start)
                off.append(len(starts))
            if others:
                rest.append((span, others))

        def tensors(*lists: list[int]) -> tuple[torch.Tensor, ...]:  # read by the CPU kernels
            return tuple(torch.tensor(v, dtype=torch.int64) for v in lists)

        cached = NativePlan(tensors(rows, *dec_runs), tensors(row0, nq, nk, *pre_runs), rest)
        self._native[(window, prefill)] = cached
        return cached

    def _cuts(self, span: SeqSpan, first_q: int) -> list[tuple[int, int]]:
        """Absolute query position ranges, one per group."""
        ctx = span.context_len
        if self.align is None or span.num_new == 1 or span.prompt_len is None:
            return [(first_q, ctx)]
        a, prompt_end = self.align, span.prompt_len
        cuts, lo = [], first_q
        while lo < min(ctx, prompt_end):
            hi = min((lo // a + 1) * a, prompt_end, ctx)
            cuts.append((lo, hi))
            lo = hi
        cuts.extend((p, p + 1) for p in range(lo, ctx))  # past the prompt: one by one, as decode
        return cuts

    @staticmethod
    def _group(span: SeqSpan, first_q: int, lo: int, hi: int, window: int | None,
               device: torch.device) -> QueryGroup:
        # Keys older than the first query's window are never read by any query of the group.
        first_k = span.kv_start if window is None else max(span.kv_start, lo - window + 1)
        assert first_k >= span.kv_start, "window reaches evicted keys: evicted too early?"
        after_prior = lo > first_k and hi - lo > 1  # several rows after keys they all see
        needs_window = window is not None and hi - first_k > window
        # On CPU a group after earlier keys runs as two calls (see QueryGroup): the masked
        # kernel would compute every block and read a mask; elsewhere one masked call.
        split = after_prior and not needs_window and device.type == "cpu"
        mask = None
        if needs_window or (after_prior and not split):
            q_pos = torch.arange(lo, hi, device=device).unsqueeze(1)
            k_pos = torch.arange(first_k, hi, device=device).unsqueeze(0)
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= q_pos - k_pos < window
            mask = allowed
        return QueryGroup(lo - first_q, hi - first_q, first_k - span.kv_start,
                          hi - span.kv_start, mask, split)


def _select(runs: list[slice], k0: int, k1: int) -> list[slice]:
    """The slots of positions [k0, k1) of a sequence whose positions are laid out in `runs`."""
    out, pos = [], 0
    for r in runs:
        size = r.stop - r.start
        lo, hi = max(k0, pos), min(k1, pos + size)
        if lo < hi:
            out.append(slice(r.start + lo - pos, r.start + hi - pos))
        pos += size
        if pos >= k1:
            break
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor,
            runs: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [Hkv, T, D] of the slots in `runs`: a view for one run, a copy for several."""
    if len(runs) == 1:
        return k_cache[:, runs[0]], v_cache[:, runs[0]]
    return (torch.cat([k_cache[:, r] for r in runs], dim=1),
            torch.cat([v_cache[:, r] for r in runs], dim=1))


def _merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets from the (output [..., D], log-sum-exp
    [...]) of each: sum_i exp(lse_i - lse) * out_i, in fp32."""
    lse = torch.stack([p[1] for p in parts])
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).unsqueeze(-1)
    return (torch.stack([p[0].float() for p in parts]) * weights).sum(0)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.layer_window(layer_id)
        self.scale = config.attention_scale
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size)
        # Per-head RMSNorm of q and k before RoPE (qwen3, gemma3); weights [head_dim].
        self.q_norm = self.k_norm = None
        if config.has_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.is_gemma)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.is_gemma)

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
        meta = meta.for_layer(self.window)
        fixed_k = meta.batch_invariant
        qkv = self.qkv_proj(x, fixed_k)
        if self.q_norm is not None:
            q = self.q_norm(qkv[:, : H * D].reshape(N * H, D)).view(N, H, D)
            k = self.k_norm(qkv[:, H * D : (H + Hkv) * D].reshape(N * Hkv, D)).view(N, Hkv, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            # q and k sit side by side in the fused projection: rotate them in one pass.
            qk = apply_rotary(qkv[:, : (H + Hkv) * D].view(N, H + Hkv, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + Hkv) * D :].view(N, Hkv, D)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            # the cache may hold another dtype (kv_cache_dtype): rounded once, here
            k_cache[:, meta.slot_mapping] = k.transpose(0, 1).to(k_cache.dtype)
            v_cache[:, meta.slot_mapping] = v.transpose(0, 1).to(v_cache.dtype)
        out = torch.empty_like(q)
        kernel = self._native_kernel(x, kv_cache)
        if kernel is not None:
            prefill = native.prefill_attention(x.dtype, kv_cache[0].dtype, D, H // Hkv)
            plan = meta.native_plan(self.window, x.device, prefill is not None)
            if len(plan.decode[0]):
                done = self._native_call(kernel, q, kv_cache, out, plan.decode)
                assert done, "decode kernel refused a dtype pair it said it takes"
            if len(plan.prefill[0]):
                done = self._native_call(prefill, q, kv_cache, out, plan.prefill)
                assert done, "prefill kernel refused a shape it said it supports"
            pending = plan.rest
        else:
            pending = [(span, meta.plan(i, self.window, x.device))
                       for i, span in enumerate(meta.spans)]
        merge_runs = not meta.batch_invariant and x.device.type == "cpu"
        for span, groups in pending:
            for g in groups:
                qi = q[span.q_start + g.q0 : span.q_start + g.q1]
                if kv_cache is None:
                    rows = slice(span.q_start + g.k0, span.q_start + g.k1)
                    o = self._attend(qi, k[rows].transpose(0, 1), v[rows].transpose(0, 1), g.mask)
                elif g.split:
                    first = g.k1 - (g.q1 - g.q0)  # first key of the group's own rows
                    kp, vp = _gather(k_cache, v_cache, _select(span.kv_slots, g.k0, first))
                    kd, vd = _gather(k_cache, v_cache, _select(span.kv_slots, first, g.k1))
                    o = self._attend_split(qi, kp, vp, kd, vd)
                else:
                    runs = _select(span.kv_slots, g.k0, g.k1)
                    if len(runs) == 1:
                        o = self._attend(qi, k_cache[:, runs[0]], v_cache[:, runs[0]], g.mask)
                    elif g.q1 - g.q0 == 1 and merge_runs:
                        o = self._attend_runs(qi, k_cache, v_cache, runs)
                    else:
                        keys, values = _gather(k_cache, v_cache, runs)
                        o = self._attend(qi, keys, values, g.mask)
                out[span.q_start + g.q0 : span.q_start + g.q1] = o
        return self.o_proj(out.view(N, H * D), fixed_k)

    def _native_kernel(self, x: torch.Tensor, kv_cache):
        """The native decode kernel when it applies here (CPU cache; compute and cache dtypes
        a pair of native.ATTENTION_DTYPES), else None."""
        if kv_cache is None or x.device.type != "cpu" or (
                (x.dtype, kv_cache[0].dtype) not in native.ATTENTION_DTYPES):
            return None
        kernel = native.paged_decode()
        if kernel is None or self.head_dim > kernel.max_dim or (
                self.num_heads // self.num_kv_heads > kernel.max_group):
            return None
        return kernel

    def _native_call(self, kernel, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                     out: torch.Tensor, tables: tuple[torch.Tensor, ...]):
        """One native attention call over every group in `tables` (a `NativePlan` table, its
        first tensor one entry per group), K/V read in place (their dtype may differ from q's);
        returns the kernel's result (1: computed)."""
        k_cache, v_cache = kv_cache
        D = self.head_dim
        assert q.stride(2) == 1 and q.stride(1) == D and out.is_contiguous()
        assert k_cache.stride() == v_cache.stride() and k_cache.stride()[1:] == (D, 1)
        assert k_cache.dtype == v_cache.dtype and out.dtype == q.dtype
        return kernel(native.DTYPES[q.dtype], native.DTYPES[k_cache.dtype], q.data_ptr(),
                      q.stride(0), k_cache.data_ptr(),
                      v_cache.data_ptr(), k_cache.stride(0), out.data_ptr(), out.stride(0),
                      *(t.data_ptr() for t in tables), len(tables[0]), self.num_heads,
                      self.num_kv_heads, D, self.scale)

    def _attend_runs(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     runs: list[slice]) -> torch.Tensor:
        """One decode query over K/V in several runs: attend to each run in place, then merge
        by log-sum-exp: out = sum_r exp(lse_r - lse) * out_r."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qg = q.view(1, Hkv, H // Hkv, D)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        dt = q.dtype  # K/V of a cache in another dtype (kv_cache_dtype) are cast per run
        parts = [flash(qg, k_cache[:, r].unsqueeze(0).to(dt), v_cache[:, r].unsqueeze(0).to(dt),
                       scale=self.scale) for r in runs]
        return _merge_by_lse(parts).to(q.dtype).view(1, H, D)

    def _attend_split(self, q: torch.Tensor, k_prior: torch.Tensor, v_prior: torch.Tensor,
                      k_diag: torch.Tensor, v_diag: torch.Tensor) -> torch.Tensor:
        """Rows q [Tq, H, D] over earlier keys (all visible) and their own Tq keys (causal),
        one flash call each, merged by log-sum-exp (CPU). -> [Tq, H, D]."""
        Tq = q.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // Hkv
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        k_prior, v_prior, k_diag, v_diag = (t.to(q.dtype) for t in (k_prior, v_prior, k_diag, v_diag))
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
        if G > 1:
            k_diag = k_diag.repeat_interleave(G, dim=0)
            v_diag = v_diag.repeat_interleave(G, dim=0)
        o_diag, lse_diag = flash(qh, k_diag.unsqueeze(0), v_diag.unsqueeze(0), 0.0, True,
                                 scale=self.scale)
        # Earlier keys: every row sees all of them, so the G query heads of a KV head stack
        # into one longer query (no K/V expansion, 3x the rows per key read).
        qf = qh.reshape(1, Hkv, G * Tq, D)
        o_prior, lse_prior = flash(qf, k_prior.unsqueeze(0), v_prior.unsqueeze(0),
                                   scale=self.scale)
        o = _merge_by_lse([(o_prior.reshape(1, H, Tq, D), lse_prior.reshape(1, H, Tq)),
                           (o_diag, lse_diag)])
        return o.to(q.dtype)[0].transpose(0, 1)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q: [Tq, H, D]; keys/values: [Hkv, Tk, D] -> [Tq, H, D]."""
        Tq = q.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a cache in another kv dtype
        if Tq == 1:
            # Decode: fold the query heads that share a KV head into the "length" axis, so no
            # K/V expansion is needed and one call covers all heads.
            qg = q.view(1, Hkv, H // Hkv, D)
            o = F.scaled_dot_product_attention(qg, keys.unsqueeze(0), values.unsqueeze(0),
                                               scale=self.scale)
            return o.view(1, H, D)
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
        o = F.scaled_dot_product_attention(
            qh,
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=H != Hkv,
            scale=self.scale,
        )
        return o[0].transpose(0, 1)
