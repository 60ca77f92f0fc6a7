"""Paged attention against a slow reference that gathers K/V slot by slot and applies masks."""

import math

import pytest
import torch

from models.attention import Attention, AttentionMetadata, SeqSpan
from models.config import tiny_config
from models.layers import RotaryEmbedding, apply_rotary

BLOCK = 4


def _layer(num_kv_heads, window):
    config = tiny_config("mistral", num_key_value_heads=num_kv_heads, sliding_window=window)
    attn = Attention(config, 0)
    g = torch.Generator().manual_seed(0)
    for p in attn.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return config, attn


def _reference(attn, config, x, span, positions, k_cache, v_cache, table, window):
    """softmax(q k^T / sqrt(d) + mask) v with K/V read one slot at a time through `table`."""
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rope = RotaryEmbedding(config)
    cos, sin = rope.cos_sin(positions, x.dtype)
    q = attn.qkv_proj(x).split(attn.split_sizes, dim=-1)[0].view(-1, H, D)
    q = apply_rotary(q, cos, sin)
    ctx = span.context_len
    keys = torch.stack([k_cache[:, table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(ctx)], 1)
    values = torch.stack([v_cache[:, table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(ctx)], 1)
    keys = keys.repeat_interleave(H // Hkv, dim=0)  # [H, ctx, D]
    values = values.repeat_interleave(H // Hkv, dim=0)
    out = torch.empty_like(q)
    for i, p in enumerate(positions.tolist()):
        scores = torch.einsum("hd,hkd->hk", q[i], keys) / math.sqrt(D)
        k_pos = torch.arange(ctx)
        allowed = (k_pos <= p) & (k_pos >= span.kv_start)
        if window is not None:
            allowed &= p - k_pos < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[i] = torch.einsum("hk,hkd->hd", scores.softmax(-1), values)
    return attn.o_proj(out.reshape(len(positions), H * D))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("align", [None, 4], ids=["one-call", "aligned-groups"])
def test_paged_attention_matches_reference(num_kv_heads, window, consecutive, align):
    """`align` splits prefill spans into batch-invariant query groups (models.attention):
    the same values, computed in several calls."""
    config, attn = _layer(num_kv_heads, window)
    g = torch.Generator().manual_seed(1)
    num_blocks = 64
    Hkv, D = attn.num_kv_heads, attn.head_dim
    k_cache = torch.randn(Hkv, num_blocks * BLOCK, D, generator=g)
    v_cache = torch.randn(Hkv, num_blocks * BLOCK, D, generator=g)
    # (cached context, new tokens): prefill from scratch, prefill after a cached prefix,
    # decode steps; lengths not multiples of the block size.
    # The (3, 9) span recomputes 2 generated tokens after its 10-token prompt (a preemption).
    cases = [(0, 7), (5, 6), (13, 1), (22, 1), (3, 9), (9, 1)]
    prompt_lens = [7, 11, 13, 22, 10, 9]
    free = list(range(num_blocks))
    if not consecutive:
        free = torch.randperm(num_blocks, generator=g).tolist()
    spans, xs, pos_list, slots, tables = [], [], [], [], []
    row = 0
    for (cached, new), prompt_len in zip(cases, prompt_lens):
        ctx = cached + new
        n_blocks = -(-ctx // BLOCK)
        table = [free.pop(0) for _ in range(n_blocks)]
        tables.append(table)
        positions = torch.arange(cached, ctx)
        slot = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions.tolist()])
        # runs of consecutive slots, built slot by slot (one run when the table is consecutive)
        runs = []
        for p in range(ctx):
            slot_p = table[p // BLOCK] * BLOCK + p % BLOCK
            if runs and runs[-1].stop == slot_p:
                runs[-1] = slice(runs[-1].start, slot_p + 1)
            else:
                runs.append(slice(slot_p, slot_p + 1))
        assert (len(runs) == 1) == (consecutive or len(table) == 1)
        spans.append(SeqSpan(row, row + new, ctx, 0, runs, prompt_len))
        xs.append(torch.randn(new, config.hidden_size, generator=g))
        pos_list.append(positions)
        slots.append(slot)
        row += new
    x = torch.cat(xs)
    positions = torch.cat(pos_list)
    meta = AttentionMetadata(spans, torch.cat(slots), align)
    cos, sin = RotaryEmbedding(config).cos_sin(positions, x.dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = attn(x, cos, sin, meta, (k_cache, v_cache))
    # the reference reads the cache after the layer wrote the new K/V
    for span, xi, pi, table in zip(spans, xs, pos_list, tables):
        want = _reference(attn, config, xi, span, pi, k_cache, v_cache, table, window)
        torch.testing.assert_close(got[span.q_start:span.q_end], want, atol=1e-5, rtol=1e-5)
    # only the new tokens' slots changed
    changed = (k_cache != k_ref).any(dim=2).any(dim=0).nonzero().flatten().sort().values
    assert changed.tolist() == sorted(torch.cat(slots).tolist())
    del v_ref


def test_paged_attention_bf16_close_to_fp32():
    config, attn = _layer(2, None)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, config.hidden_size, generator=g)
    meta32 = AttentionMetadata.for_dense([10])
    pos = torch.arange(10)
    cos, sin = RotaryEmbedding(config).cos_sin(pos, torch.float32)
    want = attn(x, cos, sin, meta32, None)
    attn16 = attn.to(torch.bfloat16)
    cos16, sin16 = RotaryEmbedding(config).cos_sin(pos, torch.bfloat16)
    got = attn16(x.bfloat16(), cos16, sin16, AttentionMetadata.for_dense([10]), None)
    # bf16 keeps 8 mantissa bits: allow ~2% of the output's scale.
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=0.02 * scale, rtol=0.02)


def test_aligned_query_groups():
    """Prompt rows in groups ending at multiples of `align` or the prompt end; rows past the
    prompt one by one; each group reads keys up to its own end."""
    meta = AttentionMetadata([SeqSpan(0, 9, 12, 0, [slice(0, 12)], prompt_len=10)], align=4)
    groups = meta.plan(0, None, torch.device("cpu"))
    first_q = 3
    cuts = [(g.q0 + first_q, g.q1 + first_q) for g in groups]
    assert cuts == [(3, 4), (4, 8), (8, 10), (10, 11), (11, 12)]
    assert [(g.k0, g.k1) for g in groups] == [(0, 4), (0, 8), (0, 10), (0, 11), (0, 12)]
    # on CPU, groups after earlier keys run as prior keys + causal diagonal; no masks
    assert [g.split for g in groups] == [False, True, True, False, False]
    assert all(g.mask is None for g in groups)
    # a window shorter than a group's keys needs the explicit mask
    windowed = meta.plan(0, 3, torch.device("cpu"))
    assert (windowed[1].k0, windowed[1].k1) == (2, 8)  # keys 2..7: the first query's window on
    assert windowed[1].mask.tolist()[0] == [True, True, True, False, False, False]
    assert not windowed[1].split
    # without align: one group
    meta = AttentionMetadata([SeqSpan(0, 9, 12, 0, [slice(0, 12)], prompt_len=10)])
    assert len(meta.plan(0, None, torch.device("cpu"))) == 1
