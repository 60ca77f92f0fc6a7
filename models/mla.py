"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache.

Per token a layer projects one KV latent c = RMSNorm(x W_DKV) (L = kv_lora_rank values) and
one rope key k_pe (R = qk_rope_head_dim), both shared by the H heads. The cache keeps only
these: per layer one "head" of L + R values per slot, [1, num_slots, L + R], in the slot
layout of `models.attention` (same block tables, slot mapping, runs, query groups); there
is no per-head K and no V copy. kv_b_proj holds, per head h, W_UK[h] [dn, L] and
W_UV[h] [dv, L] (dn = qk_nope_head_dim, dv = v_head_dim):

    k[h] = [c W_UK[h]^T | k_pe]      v[h] = c W_UV[h]^T
    score[h] = ([q_nope[h] | q_pe[h]] . k[h]) * scale

Two forms of the same attention (equal within fp32 rounding, tested):
- plain, for query groups of several rows (prefill): the group's cached latents are
  up-projected to per-head k_nope and v (T x L x H(dn + dv) once per group), then ordinary
  attention with head dim dn + R and value dim dv;
- absorbed, for single-query groups (decodes, and rows recomputed one by one under batch
  invariance): W_UK is folded into the query, q_lat[h] = q_nope[h] W_UK[h] (L values), so
  [q_lat | q_pe] scores the cached entries [c | k_pe] as they are (all H query heads against
  one KV head, read in place) and the values are c itself (a view of the same entries); then
  o[h] = o_lat[h] W_UV[h]^T. Per key it reads L + R values and up-projects nothing.

RoPE: DeepSeek lays the rope dims out in pairs (x0, x1), (x2, x3), ... (`rope_interleave`):
they are de-interleaved (evens, then odds) and rotated half-split, which equals
transformers' interleaved rotation bit for bit (q and k permuted alike, so scores agree).
The softmax scale is (dn + R)**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN
(`mla_scale`; the cos/sin factor is `layers._yarn_inv_freq`'s).

All projections go through `layers.linear` (and the per-head matmuls pad their rows as it
does), so batch-invariant runs stay batch-invariant. Always the torch path (no native kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionMetadata, QueryGroup, SeqSpan, _select
from models.config import ModelConfig
from models.layers import (
    INVARIANT_MAX_K,
    INVARIANT_ROW_GROUP,
    Linear,
    RMSNorm,
    apply_rotary,
    yarn_mscale,
)


def mla_scale(config: ModelConfig) -> float:
    """The factor on q.k, computed as transformers' DeepseekV3Attention does (same rounding)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (x0, x1), (x2, x3), ...] -> [..., x0, x2, ..., x1, x3, ...]"""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def head_matmul(x: torch.Tensor, w: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
    """Per head, x[h] @ w[h]: x [H, N, K], w [H, K, M] -> [H, N, M]. With fixed_k, rows that
    do not depend on N (as `layers.linear`: fp32 rows padded to whole groups of
    INVARIANT_ROW_GROUP, long reductions of reduced-precision inputs cut into fixed slices)."""
    H, N, K = x.shape
    if not fixed_k or x.device.type != "cpu":
        return torch.bmm(x, w)
    if x.dtype == torch.float32:
        if N % INVARIANT_ROW_GROUP == 0:
            return torch.bmm(x, w)
        padded = x.new_zeros(H, -(-N // INVARIANT_ROW_GROUP) * INVARIANT_ROW_GROUP, K)
        padded[:, :N] = x
        return torch.bmm(padded, w)[:, :N]
    if K <= INVARIANT_MAX_K:
        return torch.bmm(x, w)
    parts = -(-K // INVARIANT_MAX_K)
    step = -(-K // parts)
    out = torch.bmm(x[..., :step], w[:, :step]).float()
    for lo in range(step, K, step):
        out += torch.bmm(x[..., lo : lo + step], w[:, lo : lo + step])
    return out.to(x.dtype)


class MLAttention(nn.Module):
    """DeepseekV3Attention's parameters, in its HF names (q_proj, or q_a_proj, q_a_layernorm,
    q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj)."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        assert config.is_mla, "MLAttention needs kv_lora_rank > 0"
        H, hidden = config.num_attention_heads, config.hidden_size
        self.num_heads = H
        self.kv_lora_rank = L = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.window = None  # full attention only
        self.scale = mla_scale(config)
        self.interleave = config.rope_interleave
        # Single-query groups in the absorbed form; False computes them plain (for tests).
        self.absorb = True
        qk_dim, bias, eps = self.nope_dim + self.rope_dim, config.attention_bias, config.rms_norm_eps
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if config.q_lora_rank is None:
            self.q_proj = Linear(hidden, H * qk_dim)
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps)
            self.q_b_proj = Linear(config.q_lora_rank, H * qk_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, L + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(L, eps)
        self.kv_b_proj = Linear(L, H * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(H * self.v_dim, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # ([1, slots, L + R], unused)
    ) -> torch.Tensor:
        N = x.shape[0]
        H, L, R, dn = self.num_heads, self.kv_lora_rank, self.rope_dim, self.nope_dim
        meta = meta.for_layer(None)
        fixed_k = meta.batch_invariant
        if self.q_proj is not None:
            q = self.q_proj(x, fixed_k)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, fixed_k)), fixed_k)
        q = q.view(N, H, dn + R)
        ckv = self.kv_a_proj_with_mqa(x, fixed_k)  # [N, L + R]
        latent = self.kv_a_layernorm(ckv[:, :L])
        q_pe, k_pe = q[..., dn:], ckv[:, L:].reshape(N, 1, R)
        if self.interleave:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe, cos, sin)
        entries = torch.cat((latent, k_pe.view(N, R)), dim=1)  # what the cache holds
        cache = None
        if kv_cache is not None:
            cache = kv_cache[0][0]  # [slots, L + R]
            cache[meta.slot_mapping] = entries.to(cache.dtype)  # rounded once (kv dtype)
        q = torch.cat((q[..., :dn], q_pe), dim=-1)  # [N, H, dn + R]
        out = q.new_empty(N, H, self.v_dim)
        singles: list[tuple[SeqSpan, QueryGroup]] = []
        for i, span in enumerate(meta.spans):
            for g in meta.plan(i, None, x.device):
                if g.q1 - g.q0 == 1 and self.absorb:
                    singles.append((span, g))
                    continue
                keys = self._keys(span, g, entries, cache).to(q.dtype)
                rows = slice(span.q_start + g.q0, span.q_start + g.q1)
                out[rows] = self._attend_plain(q[rows], keys, fixed_k)
        if singles:
            rows = torch.tensor([span.q_start + g.q0 for span, g in singles], device=x.device)
            keys = [self._keys(span, g, entries, cache) for span, g in singles]
            out[rows] = self._attend_absorbed(q[rows], keys, fixed_k)
        return self.o_proj(out.view(N, H * self.v_dim), fixed_k)

    def _keys(self, span: SeqSpan, g: QueryGroup, entries: torch.Tensor,
              cache: torch.Tensor | None) -> torch.Tensor:
        """The latent entries [T, L + R] of the keys of group g: from the batch without a
        cache; from the cache slots (a view for one run, a copy for several)."""
        if cache is None:
            return entries[span.q_start + g.k0 : span.q_start + g.k1]
        runs = _select(span.kv_slots, g.k0, g.k1)
        return cache[runs[0]] if len(runs) == 1 else torch.cat([cache[r] for r in runs])

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, L] and W_UV [H, dv, L], views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _attend_plain(self, q: torch.Tensor, keys: torch.Tensor, fixed_k: bool) -> torch.Tensor:
        """q [Tq, H, dn + R] (the last Tq of the T key positions, causal); keys [T, L + R]
        -> [Tq, H, dv]."""
        Tq, T = q.shape[0], keys.shape[0]
        H, L, R, dn = self.num_heads, self.kv_lora_rank, self.rope_dim, self.nope_dim
        kv = self.kv_b_proj(keys[:, :L], fixed_k).view(T, H, dn + self.v_dim)
        k = torch.cat((kv[..., :dn], keys[:, None, L:].expand(T, H, R)), dim=-1)
        v = kv[..., dn:]
        if self.v_dim < dn + R:  # equal head dims take SDPA's flash kernel (2x measured)
            v = F.pad(v, (0, dn + R - self.v_dim))
        mask = None
        if Tq != T:  # queries after earlier keys: causal from the bottom right
            q_pos = torch.arange(T - Tq, T, device=q.device).unsqueeze(1)
            mask = torch.arange(T, device=q.device).unsqueeze(0) <= q_pos
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None and Tq > 1,
            scale=self.scale)
        return o[0, ..., : self.v_dim].transpose(0, 1)

    def _attend_absorbed(self, q: torch.Tensor, keys: list[torch.Tensor],
                         fixed_k: bool) -> torch.Tensor:
        """Single-query rows q [S, H, dn + R], row i over keys[i] [T_i, L + R] -> [S, H, dv]."""
        L, dn = self.kv_lora_rank, self.nope_dim
        w_uk, w_uv = self._weights()
        q_lat = head_matmul(q[..., :dn].transpose(0, 1), w_uk, fixed_k).transpose(0, 1)
        q_abs = torch.cat((q_lat, q[..., dn:]), dim=-1)  # [S, H, L + R]
        o_lat = q.new_empty(q.shape[0], self.num_heads, L)
        for i, k in enumerate(keys):
            k = k.to(q.dtype)[None, None]  # one KV head for all H query heads
            o_lat[i] = F.scaled_dot_product_attention(q_abs[i][None, None], k, k[..., :L],
                                                      scale=self.scale)[0, 0]
        return head_matmul(o_lat.transpose(0, 1), w_uv.transpose(1, 2), fixed_k).transpose(0, 1)
